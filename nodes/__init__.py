"""The ComfyUI layer of the pack: thin nodes over trilora_core (docs/architecture.md maps it)."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import curves, dataset, dataset_encode, load, save, tools, train

# In the order ComfyUI has always listed them (/object_info keeps it).
NODES = [load.TriLoRALoader, load.TriLoRALoaderModelOnly, load.TriLoRALoaderBlockWeights,
         dataset.TriLoRASampleImages, train.TrainTriLoRA, load.ApplyTriLoRA, save.SaveTriLoRA, *tools.NODES,
         *curves.NODES, *dataset_encode.NODES]


class TriLoRAExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> TriLoRAExtension:
    return TriLoRAExtension()
