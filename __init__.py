"""comfyui-trilora: TriLoRA (LoRA with an SVD-shaped update, U diag(s) Vt) for ComfyUI.

ComfyUI imports this package from custom_nodes/. The method itself lives in trilora_core/,
which never imports ComfyUI; nodes/ is the thin layer that plugs it into ComfyUI."""
try:
    import comfy  # noqa: F401  (present only inside ComfyUI)
except ImportError:  # imported outside ComfyUI, e.g. by a tool: the core is still usable
    comfy = None

# Only as a package (ComfyUI's loader): pytest imports a clone whose folder name is no Python
# name, such as comfyui-trilora, as the top-level module "__init__", with no package to import from.
if comfy is not None and __package__:
    from .nodes import adapter as _adapter
    from .nodes import comfy_entrypoint  # noqa: F401

    # Register at import, not only in the entry point: a graph's loaders may run before any
    # extension hook, and the stock LoraLoader must know TriLoRA files from the start.
    _adapter.register()
