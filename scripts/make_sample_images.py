"""Makes the sample style set that the training workflow uses: flat geometric shapes on
plain backgrounds, each with a caption in a .txt file beside it.

The images are drawn from fixed seeds with no anti-aliasing, so the same script always draws the
same pixels (PNG bytes can differ between zlib versions; pixels do not). They ship with the pack
in workflows/sample_style/ and are small (a few KB each), so nobody has to download a dataset to
try training.

    python scripts/make_sample_images.py            # (re)writes workflows/sample_style/
    python scripts/make_sample_images.py --check    # exits 1 if the committed files differ
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw

OUT = Path(__file__).resolve().parents[1] / "workflows" / "sample_style"
SIZE = 512
COUNT = 8
TRIGGER = "trlstyle"

BACKGROUNDS = {"cream": (246, 238, 220), "pale blue": (220, 234, 246), "pale pink": (248, 226, 230),
               "mint": (222, 244, 230)}
COLOURS = {"red": (214, 56, 48), "blue": (40, 92, 190), "yellow": (242, 190, 40), "green": (54, 150, 84),
           "orange": (238, 126, 40), "purple": (122, 66, 160), "black": (34, 34, 40)}
SHAPES = ("circle", "square", "triangle", "ring", "diamond")


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: int, cy: int, r: int, colour, background) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=colour)
    elif shape == "ring":
        draw.ellipse(box, fill=colour)
        inner = r * 11 // 20
        draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=background)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=colour)
    else:
        raise ValueError(shape)


def sample(index: int) -> tuple[Image.Image, str]:
    """The index-th sample image and its caption, from a fixed seed."""
    rng = random.Random(1000 + index)
    bg_name = list(BACKGROUNDS)[index % len(BACKGROUNDS)]
    background = BACKGROUNDS[bg_name]
    image = Image.new("RGB", (SIZE, SIZE), background)
    draw = ImageDraw.Draw(image)
    # A thick border in the style's signature colour, the same in every image: the "style".
    draw.rectangle((0, 0, SIZE - 1, SIZE - 1), outline=COLOURS["black"], width=SIZE // 32)
    picked = rng.sample([c for c in COLOURS if c != "black"], 2)
    shapes = [SHAPES[(index + k * 2) % len(SHAPES)] for k in range(2)]
    big, small = SIZE // 4, SIZE // 7
    centres = [(SIZE * 3 // 8 + rng.randrange(-20, 21), SIZE * 3 // 8 + rng.randrange(-20, 21)),
               (SIZE * 11 // 16 + rng.randrange(-20, 21), SIZE * 11 // 16 + rng.randrange(-20, 21))]
    for (cx, cy), r, shape, colour in zip(centres, (big, small), shapes, picked, strict=True):
        draw_shape(draw, shape, cx, cy, r, COLOURS[colour], background)
    caption = (f"{TRIGGER}, flat geometric illustration of a large {picked[0]} {shapes[0]} and a small "
               f"{picked[1]} {shapes[1]} on a {bg_name} background, thick black frame")
    return image, caption


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--check", action="store_true", help="compare with the files on disk instead of writing")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    stale = []
    for i in range(COUNT):
        image, caption = sample(i)
        png, txt = args.out / f"shapes_{i:02d}.png", args.out / f"shapes_{i:02d}.txt"
        if args.check:
            same_png = png.is_file() and Image.open(png).convert("RGB").tobytes() == image.tobytes()
            same_txt = txt.is_file() and txt.read_text(encoding="utf-8").strip() == caption
            if not (same_png and same_txt):
                stale.append(png.name)
            continue
        image.save(png, optimize=True)
        txt.write_text(caption + "\n", encoding="utf-8")
    if stale:
        print(f"differs from the script: {', '.join(stale)}", file=sys.stderr)
        return 1
    print(f"{COUNT} images with captions {'match' if args.check else 'written'} in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
