#!/usr/bin/env python
"""Builds the random SDXL and Flux model files the browser tests run the SDXL and Flux workflows on
(harness/fixtures/workflow_models.py), into a ComfyUI's model folders.

    python scripts/make_workflow_fixtures.py --comfyui .comfyui
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: harness
from harness import host  # noqa: E402
from harness.fixtures import workflow_models  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", type=Path, required=True, help="the ComfyUI folder whose models/ gets the files")
    args = parser.parse_args()
    host.start(comfy_dir=args.comfyui.resolve())
    for name in workflow_models.FOLDERS:
        print(workflow_models.ensure(name, args.comfyui / "models"))


if __name__ == "__main__":
    main()
