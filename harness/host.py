"""The real ComfyUI in this process, with the pack loaded by ComfyUI's own custom-node loader.

ComfyUI is imported from harness.COMFY through the command-line trainer's own boot
(train_trilora.py: import_comfyui, load_pack), so tests, benchmarks and users' training runs start
ComfyUI one way. On top of it the harness loads ComfyUI's built-in extra nodes (comfy_extras, with
TrainLoraNode, which the tests and benchmarks compare against), loads the pack from its link in
the host's custom_nodes/ as a user's ComfyUI finds it, and saves into folders the caller gives, so
the host's own folders stay clean. Host quirks: docs/architecture.md, "The development host".

    from harness import host
    host.start()                     # before anything imports a ComfyUI module
    h = host.boot(loras_dir, output_dir)
    h.nodes.NODE_CLASS_MAPPINGS["TrainTriLoRA"]
"""
from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from types import SimpleNamespace

import train_trilora  # the repo root is on sys.path wherever harness imports

from . import COMFY, PACK_LINK

_state: dict = {}


def start(device: str = "cpu", comfy_dir: Path = COMFY) -> None:
    """Imports ComfyUI from ``comfy_dir`` (default harness.COMFY) for ``device`` ("cpu", or "cuda":
    ComfyUI's own choice of GPU); a second call does nothing. ComfyUI reads its command line when
    its modules are first imported, so this comes before any `import comfy...`."""
    if "device" in _state:
        if _state["device"] != device:
            raise RuntimeError(f"ComfyUI already runs on {_state['device']} in this process, not {device}")
        return
    train_trilora.import_comfyui(comfy_dir, cpu=device == "cpu")
    _state["device"] = device


def started_device() -> str | None:
    """The device `start` imported ComfyUI for, or None before it ran."""
    return _state.get("device")


def _pack():
    if "pack" not in _state:
        import nodes

        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
        _state["pack"] = train_trilora.load_pack(PACK_LINK)
    return _state["pack"]


def boot(loras: Path, output: Path, device: str = "cpu") -> SimpleNamespace:
    """ComfyUI's modules and the loaded pack, saving to these folders: ``loras`` becomes the first
    loras folder (what SaveTriLoRA writes into), ``output`` the output folder; every progress
    update reaches the progress hook. Loads the pack once per process. Fields: nodes (ComfyUI's
    nodes module), folder_paths, mm (comfy.model_management), loaded_ok (ComfyUI's loader reported
    no import error), pack and core (the pack's package and its trilora_core, as ComfyUI imported
    them), pack_dir, loras, output."""
    start(device)
    pack = _pack()
    import comfy.model_management
    import comfy.utils
    import folder_paths

    import nodes

    # Newer ComfyUI (0.33) passes on a progress update at most every 100 ms; the tests and the
    # benchmarks count and time every step.
    for name in ("PROGRESS_THROTTLE_MIN_INTERVAL", "PROGRESS_THROTTLE_MIN_PERCENT"):
        if hasattr(comfy.utils, name):
            setattr(comfy.utils, name, 0)
    folder_paths.add_model_folder_path("loras", str(loras), is_default=True)
    folder_paths.set_output_directory(str(output))
    return SimpleNamespace(nodes=nodes, folder_paths=folder_paths, mm=comfy.model_management,
                           loaded_ok=pack is not None, pack=pack, pack_dir=PACK_LINK,
                           core=sys.modules.get(f"{pack.__name__}.trilora_core") if pack else None,
                           loras=loras, output=output)


def pack_module(host: SimpleNamespace, name: str):
    """One of the pack's modules as ComfyUI imported it, by its path in the pack ("nodes.train")."""
    return sys.modules[f"{host.pack.__name__}.{name}"]


def as_loader_made(patcher, factory):
    """A hand-built ModelPatcher given what ComfyUI's loaders give theirs from 0.33 on
    (cached_patcher_init): a way to load the same model again, which nodes that copy the model
    by reloading it need (TrainLoraNode: clone(force_deepcopy=True)). ``factory()`` must return a
    ModelPatcher of the same weights, made in the caller's inference mode as a loader's would be.
    Returns ``patcher``; on a ComfyUI without the hook (0.3.75) it is left as it is."""
    if hasattr(patcher, "cached_patcher_init"):
        patcher.cached_patcher_init = (lambda disable_dynamic=False: factory(), ())
    return patcher
