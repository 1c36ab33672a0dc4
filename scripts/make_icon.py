"""Draws the pack's icon for the Comfy Registry and ComfyUI-Manager (docs/icon.png, referenced by
[tool.comfy] Icon in pyproject.toml): TriLoRA's update U diag(s) Vt as three blocks, a tall U, the
diagonal s with its values falling, and a wide Vt. 400 x 400 (the Registry's largest icon),
square, drawn without anti-aliasing, so the same script always draws the same pixels.

    python scripts/make_icon.py            # (re)writes docs/icon.png
    python scripts/make_icon.py --check    # exits 1 if the committed icon differs
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image, ImageChops, ImageDraw

OUT = Path(__file__).resolve().parents[1] / "docs" / "icon.png"
SIZE = 400


def draw() -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), (28, 30, 38))
    d = ImageDraw.Draw(image)
    d.rectangle((40, 70, 110, 330), fill=(64, 132, 214))  # U: out x r
    for i, half in enumerate((14, 11, 8, 5)):  # s: the diagonal, strongest first
        c = (148 + 30 * i, 140 + 30 * i)
        d.rectangle((c[0] - half, c[1] - half, c[0] + half, c[1] + half), fill=(240, 160, 48))
    d.rectangle((256, 150, 370, 250), fill=(72, 178, 112))  # Vt: r x in
    return image


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed icon instead of writing")
    if parser.parse_args().check:
        with Image.open(OUT) as committed:
            same = committed.size == (SIZE, SIZE) and not ImageChops.difference(committed.convert("RGB"),
                                                                                draw()).getbbox()
        if not same:
            print(f"{OUT} is not what scripts/make_icon.py draws; run it", file=sys.stderr)
        return 0 if same else 1
    draw().save(OUT, optimize=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
