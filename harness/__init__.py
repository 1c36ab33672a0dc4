"""The development harness of comfyui-trilora: the real ComfyUI for tests, benchmarks and the demo.

- harness.host: ComfyUI in this process (on the CPU or a GPU), the pack loaded by ComfyUI's own
  custom-node loader; the boot itself is the command-line trainer's (train_trilora.py).
- harness.server: ComfyUI's main.py as a server on 127.0.0.1, and a client for it.
- harness.browser: the server's own frontend in headless Chromium (UI workflow -> API prompt).
- harness.bench: what the benchmark scripts share (the measuring host, full-size models, runs).
- harness.workflows: the specs of the committed workflows (scripts/make_workflows.py builds them).
- harness.fixtures: the models and pictures tests, benchmarks and the demo run on: the tiny random
  model of every family (tiny), the SDXL/Flux workflow models (workflow_models), the sample style
  pictures (sample_images) and the demo's drawing model (drawing, drawing_pictures/_vae/_unet).
- harness.picture_stats: the statistics the demo and its tests read off generated pictures.

Development only: ComfyUI never imports it (the pack's __init__.py imports nodes/ alone), and
nothing in nodes/ or trilora_core/ may. Tests reach it through pytest's pythonpath (the repo
root), the scripts in scripts/ by putting the repo root on sys.path (only entry points do that:
tests/core/test_code_structure.py).

The host is harness.COMFY: $COMFYUI_DIR, else the .comfyui/ that `make setup` builds (ComfyUI
CI_COMFYUI, 0.3.75); COMFY_VERSION is the host's own (`make test-newest` runs tests/comfy on another).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMFY = Path(os.environ.get("COMFYUI_DIR") or REPO / ".comfyui").resolve()
# The pack as a user has it: a folder (here a link to the repo) in the host's custom_nodes/.
PACK_LINK = COMFY / "custom_nodes" / "comfyui-trilora"
TINY = "trilora-tiny-sd15.safetensors"  # the tiny SD1.5 checkpoint that `make setup` puts in the host
CI_COMFYUI = (0, 3, 75)  # the ComfyUI that scripts/setup.sh installs and CI tests against


def comfy_version(root: Path) -> tuple[int, ...]:
    """The version of the ComfyUI at ``root`` (its comfyui_version.py, read without importing
    ComfyUI), e.g. (0, 33, 0); () where the file is missing or unreadable."""
    try:
        text = (root / "comfyui_version.py").read_text(encoding="utf-8")
    except OSError:
        return ()
    found = re.search(r"""__version__\s*=\s*["'](\d+(?:\.\d+)*)""", text)
    return tuple(int(part) for part in found.group(1).split(".")) if found else ()


COMFY_VERSION = comfy_version(COMFY)
