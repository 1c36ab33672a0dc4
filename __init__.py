"""comfyui-trilora: TriLoRA (LoRA with an SVD-shaped update, U diag(s) Vt) for ComfyUI.

ComfyUI imports this package from custom_nodes/. The method itself lives in trilora_core/,
which never imports ComfyUI; nodes/ is the thin layer that plugs it into ComfyUI."""
try:
    import comfy  # noqa: F401  (present only inside ComfyUI)
except ImportError:  # imported outside ComfyUI, e.g. by a tool: the core is still usable
    comfy = None

if comfy is not None:
    from .nodes import adapter as _adapter
    from .nodes import comfy_entrypoint  # noqa: F401

    # Register at import, not only in the entry point: a graph's loaders may run before any
    # extension hook, and the stock LoraLoader must know TriLoRA files from the start.
    _adapter.register()
