"""The ComfyUI layer of the pack: thin nodes over trilora_core."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import dataset, load, save, tools, train


class TriLoRAExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [*load.NODES, *dataset.NODES, *train.NODES, *save.NODES, *tools.NODES]


async def comfy_entrypoint() -> TriLoRAExtension:
    return TriLoRAExtension()
