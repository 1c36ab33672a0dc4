"""The real ComfyUI, in this process, with the pack loaded by ComfyUI's own custom-node loader.

ComfyUI is imported from COMFYUI_DIR (default: the .comfyui/ that `make setup` builds), on the
CPU. Files the tests write go to a temporary loras folder registered with folder_paths, so the
host's own folders stay clean."""
from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[2]
COMFY = Path(os.environ.get("COMFYUI_DIR") or REPO / ".comfyui").resolve()
TINY = "trilora-tiny-sd15.safetensors"

# ComfyUI reads its command line when its modules are first imported.
sys.path.insert(0, str(COMFY))
sys.argv = [sys.argv[0], "--cpu"]
import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()

import comfy.model_management  # noqa: E402
import folder_paths  # noqa: E402

import nodes  # noqa: E402

_loaded = {}


def _load_pack():
    if not _loaded:
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
        pack_dir = COMFY / "custom_nodes" / "comfyui-trilora"
        _loaded["ok"] = asyncio.run(nodes.load_custom_node(str(pack_dir)))
        _loaded["module"] = next(m for m in sys.modules.values()
                                 if getattr(m, "__file__", None) == str(pack_dir / "__init__.py"))
    return _loaded


def boot_host(loras: Path, output: Path) -> SimpleNamespace:
    """ComfyUI's modules and the loaded pack (its package and its trilora_core), saving to these folders."""
    loaded = _load_pack()
    folder_paths.add_model_folder_path("loras", str(loras), is_default=True)
    folder_paths.set_output_directory(str(output))
    pack = loaded["module"]
    return SimpleNamespace(nodes=nodes, folder_paths=folder_paths, mm=comfy.model_management,
                           loaded_ok=loaded["ok"], pack=pack, pack_dir=COMFY / "custom_nodes" / "comfyui-trilora",
                           core=sys.modules[pack.__name__ + ".trilora_core"], loras=loras)


@pytest.fixture(scope="session")
def comfy_host(tmp_path_factory):
    return boot_host(tmp_path_factory.mktemp("loras"), tmp_path_factory.mktemp("output"))


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
