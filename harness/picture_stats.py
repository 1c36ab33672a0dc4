"""Statistics of generated pictures that the demo and its tests read: the sample style's thick
black frame (`frame_contrast`) and whether the caption's large shape keeps its colour
(`colour_distance`, in the sample style's vocabulary)."""
from __future__ import annotations

import numpy as np
from PIL import Image

from .fixtures import sample_images as style

# Frame contrast below this is a frame a user sees: the sample pictures' is -0.07 to -0.25 (mean
# about -0.16); frameless pictures on the light sample backgrounds are positive (+0.17 to +0.43).
FRAME_PRESENT = -0.05


def luminance(image) -> np.ndarray:
    """PIL image or [3, H, W] / [H, W, 3] array in [0, 1] or 0-255 -> [H, W] luminance in [0, 1]."""
    if isinstance(image, Image.Image):
        a = np.asarray(image.convert("RGB"), dtype=np.float64) / 255
    else:
        a = np.asarray(image, dtype=np.float64)
        a = a.transpose(1, 2, 0) if a.shape[0] == 3 else a
        a = a / 255 if a.max() > 1.5 else a
    return a @ np.array([0.299, 0.587, 0.114])


def frame_contrast(image, band: float = 1 / 16) -> float:
    """Mean luminance of the outer band (``band`` of the side on each edge: 8 px at 128 px, twice
    the sample style's frame) minus that of the centre (the middle half). The sample pictures:
    about -0.2 (a dark frame round lighter pictures); frameless pictures on a light background:
    positive (their shapes are darker than the background). In [-1, 1]."""
    lum = luminance(image)
    h, w = lum.shape
    b = max(1, round(min(h, w) * band))
    mask = np.zeros_like(lum, dtype=bool)
    mask[:b], mask[-b:], mask[:, :b], mask[:, -b:] = True, True, True, True
    centre = lum[h // 4: h - h // 4, w // 4: w - w // 4]
    return float(lum[mask].mean() - centre.mean())


def colour_distance(image, colour: str, box=(0.3, 0.3, 0.45, 0.45)) -> dict[str, float]:
    """How near the picture's region ``box`` (left, top, right, bottom as fractions of the side:
    by default the middle of the large shape in the sample layout) is to the named colour of the
    sample vocabulary: {"distance": RGB distance to it in [0, 1] units, "nearest": the vocabulary
    colour nearest to the region's mean, "margin": distance to the second nearest minus to it}."""
    a = np.asarray(image.convert("RGB"), dtype=np.float64) / 255
    h, w = a.shape[:2]
    left, top, right, bottom = box
    mean = a[int(top * h): int(bottom * h), int(left * w): int(right * w)].reshape(-1, 3).mean(0)
    vocab = {**style.COLOURS, **style.BACKGROUNDS}
    dist = {name: float(np.linalg.norm(mean - np.array(rgb) / 255)) for name, rgb in vocab.items()}
    nearest = sorted(dist, key=dist.get)
    return {"distance": dist[colour], "nearest": nearest[0], "margin": dist[nearest[1]] - dist[nearest[0]],
            "mean_rgb": [round(float(v), 3) for v in mean]}
