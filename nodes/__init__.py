"""The ComfyUI layer of the pack: thin nodes over trilora_core."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import load


class TriLoRAExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [*load.NODES]


async def comfy_entrypoint() -> TriLoRAExtension:
    return TriLoRAExtension()
