#!/usr/bin/env python
"""Writes the sample style set the training workflow uses (workflows/sample_style/: flat shapes
with a thick black frame, a caption beside each) from fixed seeds; harness/fixtures/sample_images.py.

    python scripts/make_sample_images.py            # (re)writes workflows/sample_style/
    python scripts/make_sample_images.py --check    # exits 1 if the committed files differ
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: harness
from harness.fixtures import sample_images  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=sample_images.OUT)
    parser.add_argument("--check", action="store_true", help="compare with the files on disk instead of writing")
    args = parser.parse_args()
    stale = sample_images.check_or_write(args.out, args.check)
    if stale:
        print(f"differs from the script: {', '.join(stale)}", file=sys.stderr)
        return 1
    print(f"{sample_images.COUNT} images with captions {'match' if args.check else 'written'} in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
