"""Training images with captions from a folder: by default the small sample set that ships with
the pack (workflows/sample_style/), so the training workflow runs with nothing to download."""
from __future__ import annotations

import os
from pathlib import Path

import folder_paths
import numpy as np
import torch
from comfy_api.latest import io
from PIL import Image, ImageOps

from .file_cache import file_signature

SAMPLE_DIR = Path(__file__).resolve().parents[1] / "workflows" / "sample_style"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def resolve_folder(folder: str) -> Path:
    """The folder to read: the bundled sample set for "", an absolute path as given, anything else
    under ComfyUI's input directory (as ComfyUI's own dataset nodes do)."""
    folder = folder.strip()
    if not folder:
        return SAMPLE_DIR
    path = Path(os.path.expanduser(folder))
    if not path.is_absolute():
        path = Path(folder_paths.get_input_directory()) / path
    if not path.is_dir():
        raise ValueError(f"TriLoRASampleImages: folder not found: {path} (an absolute path, or a folder "
                         f"inside ComfyUI's input directory; leave empty for the bundled sample set)")
    return path


def image_files(path: Path) -> list[Path]:
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"TriLoRASampleImages: no images ({', '.join(IMAGE_EXTENSIONS)}) in {path}")
    return files


def square(image: Image.Image, size: int) -> Image.Image:
    """Centre-crops to a square and resizes to size x size."""
    image = ImageOps.exif_transpose(image).convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if side != size:
        image = image.resize((size, size), Image.Resampling.LANCZOS)
    return image


def load_image(path: Path, size: int) -> torch.Tensor:
    with Image.open(path) as image:
        pixels = np.asarray(square(image, size), dtype=np.float32) / 255.0
    return torch.from_numpy(pixels)[None]  # [1, H, W, 3], as ComfyUI's IMAGE


def read_caption(path: Path) -> str:
    caption = path.with_suffix(".txt")
    return caption.read_text(encoding="utf-8").strip() if caption.is_file() else ""


def caption_signature(path: Path) -> tuple | None:
    caption = path.with_suffix(".txt")
    return file_signature(str(caption)) if caption.is_file() else None


class TriLoRASampleImages(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TriLoRASampleImages",
            display_name="Load Training Images (TriLoRA)",
            category="training",
            description="Loads a folder of training images with a caption for each (a .txt file of the same "
                        "name). Empty folder = the small sample style set that ships with the pack.",
            inputs=[
                io.String.Input(
                    id="folder", default="",
                    tooltip="Empty: the sample style set bundled with the pack (8 flat geometric pictures, "
                            "captions start with 'trlstyle'). Otherwise an absolute path, or a folder inside "
                            "ComfyUI's input directory. Captions come from .txt files beside the images."),
                io.Int.Input(
                    id="size", default=512, min=64, max=2048, step=64,
                    tooltip="Every image is centre-cropped to a square and resized to size x size, so all "
                            "of them train together. 512 suits SD1.5; use less for quick tests."),
            ],
            outputs=[
                io.Image.Output(display_name="images", is_output_list=True,
                                tooltip="One image per file, in file-name order: feed VAE Encode."),
                io.String.Output(display_name="captions", is_output_list=True,
                                 tooltip="The caption of each image (empty where its .txt is missing): "
                                         "feed CLIP Text Encode."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, folder, size):
        """Re-run when an image or caption is added, removed or changed, not only when the inputs
        do: each file's file_signature, the loaders' change check, so a caption rewritten in place
        with its old size and modification time (cp -p, rsync -t) is seen by its ctime."""
        try:
            files = image_files(resolve_folder(folder))
            signatures = [(file_signature(str(f)), caption_signature(f)) for f in files]
        except (OSError, ValueError):
            return f"{folder}|{size}"
        return f"{size}|{signatures}"

    @classmethod
    def execute(cls, folder, size):
        files = image_files(resolve_folder(folder))
        return io.NodeOutput([load_image(f, size) for f in files], [read_caption(f) for f in files])


NODES = [TriLoRASampleImages]
