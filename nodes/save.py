"""SaveTriLoRA: writes an in-memory TriLoRA into ComfyUI's loras folder, so the loaders list it
at once (naming rules: nodes/loras_folder.py)."""
from __future__ import annotations

import logging

from comfy_api.latest import io

from ..trilora_core import TriLoRAFile
from .loras_folder import prefix_location, relative_name, save_new_file
from .schema import TRILORA

log = logging.getLogger("comfyui-trilora")


class SaveTriLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SaveTriLoRA",
            display_name="Save TriLoRA",
            category="training",
            is_output_node=True,
            description="Saves a TriLoRA (e.g. from Train TriLoRA) into your loras folder in canonical form, "
                        "with its training arguments; it appears in the TriLoRA loaders at once.",
            inputs=[
                TRILORA.Input(id="trilora", tooltip="The TriLoRA to save, e.g. the TRILORA output of Train TriLoRA."),
                io.String.Input(
                    id="filename_prefix", default="trilora/trained",
                    tooltip="File name inside the loras folder ('/' makes subfolders). A counter is added "
                            "(name_00001_.safetensors) so no file is ever replaced."),
            ],
            outputs=[
                io.String.Output(display_name="filename",
                                 tooltip="The saved file's name as the loaders list it (relative to the loras folder)."),
            ],
        )

    @classmethod
    def execute(cls, trilora, filename_prefix):
        if not isinstance(trilora, TriLoRAFile) or not trilora.layers:
            raise ValueError("SaveTriLoRA: trilora holds no layers; connect the TRILORA output of Train TriLoRA")
        folder, base = prefix_location(filename_prefix, "SaveTriLoRA")
        path = save_new_file(trilora, folder, base)
        name = relative_name(path)
        log.info("TriLoRA saved to %s", path)
        return io.NodeOutput(name)


NODES = [SaveTriLoRA]
