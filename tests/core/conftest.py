"""The trilora_core unit tests need only torch, safetensors and hypothesis (no ComfyUI)."""

from __future__ import annotations

# The repo root (trilora_core, harness) is on sys.path through pytest's `pythonpath` (pyproject.toml).
