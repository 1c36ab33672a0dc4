"""Training images with captions from a folder: by default the small sample set that ships with
the pack (workflows/sample_style/), so the training workflow runs with nothing to download. Each
picture keeps its aspect in a bucket (trilora_core/buckets.py, kohya's bucketing), or is
centre-cropped to a square."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import folder_paths
import numpy as np
import torch
from comfy_api.latest import io
from PIL import Image, ImageOps

from ..trilora_core import group_buckets, select_bucket
from .file_cache import file_signature

log = logging.getLogger("comfyui-trilora")

SAMPLE_DIR = Path(__file__).resolve().parents[1] / "workflows" / "sample_style"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
BUCKETS, SQUARE = "aspect buckets", "square crop"


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


def bucketed(image: Image.Image, size: int, upscale: bool) -> Image.Image:
    """Scaled to cover its bucket (select_bucket) and centre-cropped to it."""
    image = ImageOps.exif_transpose(image).convert("RGB")
    (width, height), resized = select_bucket(image.width, image.height, size, upscale)
    if resized != image.size:
        image = image.resize(resized, Image.Resampling.LANCZOS)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


def _no_bucket(path: Path, err: ValueError) -> ValueError:
    return ValueError(f"TriLoRASampleImages: {path}: {err}; turn upscale on, or leave the picture out")


def load_image(path: Path, size: int, resize: str = BUCKETS, upscale: bool = False) -> torch.Tensor:
    """[1, H, W, 3] float32 in 0..1, as ComfyUI's IMAGE; ValueError naming the file when it has no bucket."""
    with Image.open(path) as image:
        try:
            picture = square(image, size) if resize == SQUARE else bucketed(image, size, upscale)
        except ValueError as err:
            raise _no_bucket(path, err) from None
        pixels = np.asarray(picture, dtype=np.float32) / 255.0
    return torch.from_numpy(pixels)[None]


def check_picture(path: Path, size: int, resize: str = BUCKETS, upscale: bool = False) -> None:
    """load_image's error for a picture without a bucket, from its header alone (its size: the
    check does not depend on its orientation), so the command line stops before anything loads."""
    if resize == BUCKETS:
        with Image.open(path) as image:
            try:
                select_bucket(*image.size, size, upscale)
            except ValueError as err:
                raise _no_bucket(path, err) from None


def note_lone_pictures(files: list[Path], images: list[torch.Tensor]) -> None:
    """A note for each picture alone in its bucket: it trains in batches of one, as in kohya's trainer."""
    groups = group_buckets([tuple(image.shape) for image in images])
    if len(groups) > 1:
        for items in groups:
            if len(items) == 1:
                _, height, width, _ = images[items[0]].shape
                log.warning("TriLoRA: %s is the only picture in its bucket (%d x %d px): it trains alone, in "
                            "batches of one", files[items[0]].name, width, height)


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
                    tooltip="The training resolution: with aspect buckets, each picture keeps its aspect within "
                            "an area of size x size (sides in steps of 64); with square crop, it is centre-cropped "
                            "to a square and resized to size x size. 512 suits SD1.5, 1024 SDXL and Flux; use less "
                            "for quick tests."),
                io.Combo.Input(
                    id="resize", options=[BUCKETS, SQUARE], default=BUCKETS, optional=True,
                    tooltip="aspect buckets: each picture keeps its aspect ratio, as kohya's bucketing does (a "
                            "batch draws from pictures of one size). square crop: the centre square of each."),
                io.Boolean.Input(
                    id="upscale", default=False, optional=True,
                    tooltip="Aspect buckets only. Off (kohya's bucket_no_upscale): a picture larger than the area "
                            "is scaled down to it, a smaller one trains at its own size (cropped to steps of 64), "
                            "one under 64 px a side is an error. On: every picture is scaled, up or down, to the "
                            "bucket of the nearest aspect ratio (kohya's default)."),
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
    def fingerprint_inputs(cls, folder, size, resize=BUCKETS, upscale=False):
        """Re-run when an image or caption is added, removed or changed, not only when the inputs
        do: each file's file_signature, the loaders' change check, so a caption rewritten in place
        with its old size and modification time (cp -p, rsync -t) is seen by its ctime."""
        try:
            files = image_files(resolve_folder(folder))
            signatures = [(file_signature(str(f)), caption_signature(f)) for f in files]
        except (OSError, ValueError):
            return f"{folder}|{size}|{resize}|{upscale}"
        return f"{size}|{resize}|{upscale}|{signatures}"

    @classmethod
    def execute(cls, folder, size, resize=BUCKETS, upscale=False):
        files = image_files(resolve_folder(folder))
        images = [load_image(f, size, resize, upscale) for f in files]
        note_lone_pictures(files, images)
        return io.NodeOutput(images, [read_caption(f) for f in files])


NODES = [TriLoRASampleImages]
