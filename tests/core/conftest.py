"""The trilora_core unit tests need only torch, safetensors and hypothesis (no ComfyUI)."""

from __future__ import annotations

import os
import sys

# The package must import from the repo root even when pytest runs from elsewhere.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)
