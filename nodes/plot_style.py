"""What the pack's pictures share (the spectrum of tools/spectrum_plot.py, the training curves of
curves_plot.py): colours, the font, and a PIL picture as ComfyUI's IMAGE. PIL only."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageFont

BACKGROUND = (255, 255, 255)
INK = (40, 40, 40)
GRID = (225, 225, 225)
GUIDE = (150, 150, 150)


def load_font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def to_comfy_image(image: Image.Image) -> torch.Tensor:
    """A PIL RGB picture as ComfyUI's IMAGE: [1, H, W, 3] float32 in [0, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None]
