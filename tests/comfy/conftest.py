"""The real ComfyUI, in this process, with the pack loaded by ComfyUI's own custom-node loader
(harness/host.py).

ComfyUI is imported from COMFYUI_DIR (default: the .comfyui/ that `make setup` builds), on the
CPU. Files the tests write go to a temporary loras folder registered with folder_paths, so the
host's own folders stay clean."""
from __future__ import annotations

import pytest

from harness import COMFY, REPO, TINY, host

host.start()  # ComfyUI reads its command line when its modules are first imported: before the tests import them

__all__ = ["COMFY", "REPO", "TINY", "run_node"]  # what the test modules import from here


@pytest.fixture(scope="session")
def comfy_host(tmp_path_factory):
    return host.boot(tmp_path_factory.mktemp("loras"), tmp_path_factory.mktemp("output"))


@pytest.fixture(scope="session")
def tiny(comfy_host):
    """(model, clip, vae) of the tiny SD1.5 checkpoint, loaded by CheckpointLoaderSimple."""
    from tiny_models import tiny_model

    return tiny_model("sd15")


def run_node(comfy_host, node_id: str, **inputs):
    """Runs one node the way the executor does for a V3 node (its class-level execute)."""
    cls = comfy_host.nodes.NODE_CLASS_MAPPINGS[node_id]
    out = cls.execute(**inputs)
    return tuple(out.result) if hasattr(out, "result") else out
