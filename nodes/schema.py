"""Schema pieces the nodes share: the TRILORA and LOSS_MAP types, the strength slider, the loras
file choice, rank / energy limits, save options, and output builders. Each builder returns a new
object per schema: newer ComfyUI writes ids into inputs and outputs in place, so one shared
instance would carry another node's id."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from .loras_folder import file_choice

TRILORA = io.Custom("TRILORA")  # an in-memory TriLoRAFile (trilora_core)
LOSS_MAP = io.Custom("LOSS_MAP")  # {"loss": [float per step]}, as ComfyUI's Plot Loss Graph reads it
STRENGTH_LIMIT = 10.0
SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
EXACT_DTYPE = "fp32 keeps the result exact; fp16/bf16 halve the file and round each factor."


def slider_input(name: str, tooltip: str) -> io.Float.Input:
    return io.Float.Input(id=name, default=1.0, min=-STRENGTH_LIMIT, max=STRENGTH_LIMIT, step=0.01,
                          display_mode=io.NumberDisplay.slider, tooltip=tooltip)


def strength_input(name: str, what: str) -> io.Float.Input:
    return slider_input(name, f"How strongly to modify the {what}: 1.0 applies the adapter as trained, 0 leaves "
                              f"the {what} untouched, negative values push the other way.")


def trilora_file_input() -> io.Combo.Input:
    """The loaders' trilora_name."""
    return file_choice("trilora_name", "A TriLoRA file from your loras folder. A standard LoRA/LoCon file works too: "
                       "it is converted exactly, so rank truncation applies to it as well.")


def optional_trilora_input(tooltip: str, input_id: str = "trilora"):
    return TRILORA.Input(id=input_id, optional=True, tooltip=tooltip)


def max_rank_input(tooltip: str, default: int = 0, optional: bool = False) -> io.Int.Input:
    return io.Int.Input(id="max_rank", default=default, min=0, max=4096, optional=optional, tooltip=tooltip)


def energy_input(tooltip: str, optional: bool = False) -> io.Float.Input:
    return io.Float.Input(id="energy", default=1.0, min=0.01, max=1.0, step=0.01, optional=optional, tooltip=tooltip)


def prefix_input(default: str) -> io.String.Input:
    return io.String.Input(
        id="filename_prefix", default=default,
        tooltip="Name of the new file inside your loras folder ('/' makes subfolders). A counter is added "
                "(name_00001_.safetensors), so no file is ever replaced.")


def dtype_input(default: str, why: str) -> io.Combo.Input:
    return io.Combo.Input(id="save_dtype", options=list(SAVE_DTYPES), default=default,
                          tooltip=f"Precision of the saved factors. {why}")


def filename_output() -> io.String.Output:
    return io.String.Output(id="filename", display_name="filename", tooltip="The new file's name as the loaders "
                            "list it (relative to the loras folder).")


def trilora_output():
    return TRILORA.Output(id="TRILORA", display_name="TRILORA", tooltip="The TriLoRA just written, read back from "
                          "the file: connect Apply TriLoRA, TriLoRA Spectrum or another tool.")


def info_output(tooltip: str) -> io.String.Output:
    return io.String.Output(id="info", display_name="info", tooltip=tooltip)
