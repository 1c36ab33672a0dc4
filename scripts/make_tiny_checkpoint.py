#!/usr/bin/env python
"""Builds the tiny random models the tests use (harness/fixtures/tiny.py: one per model family) and
the demo's drawing model (harness/fixtures/drawing.py) into a ComfyUI's model folders.

    python scripts/make_tiny_checkpoint.py --comfyui .comfyui            # SD1.5, into its checkpoints folder
    python scripts/make_tiny_checkpoint.py --comfyui .comfyui --family all
    python scripts/make_tiny_checkpoint.py --output /tmp/tiny.safetensors --force
    python scripts/make_tiny_checkpoint.py --comfyui .comfyui --drawing  # + the drawing model (make setup)

`--drawing` also builds `trilora-drawing-sd15.safetensors`: the SD1.5 fixture with a VAE that keeps
flat colours and a UNet pretrained from a fixed seed on captioned flat shapes (`make demo` trains
the sample style on it). It is rebuilt only when missing or when its build code changed.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: harness
from harness import host  # noqa: E402
from harness.fixtures.tiny import FAMILIES, SEED, write, write_drawing  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui", type=Path, default=Path(os.environ.get("COMFYUI_DIR", ".comfyui")),
                        help="ComfyUI folder (its modules give the shapes; default output is its models folders)")
    parser.add_argument("--family", default="sd15", choices=[*FAMILIES, "all"],
                        help="which fixture to build (default: the SD1.5 checkpoint)")
    parser.add_argument("--output", type=Path, help="file to write instead (one family)")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--force", action="store_true", help="write even if the file exists")
    parser.add_argument("--drawing", action="store_true",
                        help="also build the demo's drawing model from the SD1.5 fixture (minutes, once)")
    args = parser.parse_args()

    host.start(comfy_dir=args.comfyui.resolve())
    families = list(FAMILIES) if args.family == "all" else [args.family]
    if args.output and len(families) > 1:
        parser.error("--output takes one family")
    for family in families:
        fam = FAMILIES[family]
        path = args.output or args.comfyui / "models" / fam.folder / fam.file_name
        if path.exists() and not args.force:
            continue
        write(path, args.seed, family)
        print(f"[setup] wrote {path}")
    if args.drawing:
        write_drawing(args.comfyui / "models" / "checkpoints")



if __name__ == "__main__":
    main()
