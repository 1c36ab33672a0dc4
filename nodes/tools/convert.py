"""The exact conversions: any LoRA/LoCon file to a canonical TriLoRA (Convert), and a TriLoRA to a
kohya LoRA/LoCon file (Export). Both keep the weight change exactly; with a reference model
connected, layer names are rewritten to the pack's or kohya's names (trilora_core.key_map)."""
from __future__ import annotations

import logging

from comfy_api.latest import io

from ...trilora_core import (
    atomic_write_bytes,
    kohya_prefixes,
    lora_file_bytes,
    lora_metadata,
    prefixes_by_weight,
    rename_layers,
)
from ..loras_folder import (
    OptionalLorasFileNode,
    check_names,
    file_choice,
    files_fingerprint,
    place_new_file,
    prefix_location,
    relative_name,
)
from ..schema import (
    EXACT_DTYPE,
    SAVE_DTYPES,
    dtype_input,
    filename_output,
    info_output,
    optional_trilora_input,
    prefix_input,
    trilora_output,
)
from .common import (
    alias_text,
    carried_metadata,
    rank_text,
    read_source,
    reference_inputs,
    reference_key_map,
    save_tool_output,
    tool_args,
    tool_schema,
    unknown_text,
)

log = logging.getLogger("comfyui-trilora")


def renamed(node: str, layers: dict, reference: tuple[dict, dict] | None, kohya: bool):
    """trilora_core.rename_layers under the reference model's names (the pack's, or kohya's);
    its ValueError gets the node's name."""
    key_map, shapes = reference if reference is not None else (None, {})
    names = {} if key_map is None else kohya_prefixes(key_map) if kohya else prefixes_by_weight(key_map)
    try:
        return rename_layers(layers, key_map, shapes, names)
    except ValueError as err:
        raise ValueError(f"{node}: {err}") from None


class TriLoRAConvertLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return tool_schema(
            cls, "Convert LoRA to TriLoRA",
            "Converts a LoRA/LoCon file (kohya, ComfyUI-trained, diffusers/PEFT names) into a canonical TriLoRA "
            "file with exactly the same weight change, so any LoRA gains optimal rank truncation and a spectrum.",
            inputs=[
                file_choice("lora_name", "The LoRA/LoCon file to convert, from your loras folder."),
                prefix_input("trilora/converted"),
                dtype_input("fp32", EXACT_DTYPE),
                *reference_inputs("the pack's kohya-style names (lora_unet_..., lora_te_...)"),
            ],
            outputs=[trilora_output(), filename_output(),
                     info_output("How many layers were converted, their ranks, and any layer names the "
                                 "connected model does not know.")],
        )

    @classmethod
    def validate_inputs(cls, lora_name=None):
        return check_names(lora_name, none=False)

    @classmethod
    def fingerprint_inputs(cls, lora_name, **_):
        return files_fingerprint(lora_name)

    @classmethod
    def execute(cls, lora_name, filename_prefix, save_dtype, model=None, clip=None):
        node = cls.__name__
        location = prefix_location(filename_prefix, node)
        _, source = read_source(node, lora_name, None, "lora_name")
        reference = reference_key_map(model, clip)
        layers, unknown, aliases = renamed(node, source.layers, reference, kohya=False)
        metadata = {**carried_metadata(source.metadata),
                    **tool_args("convert", source=lora_name, renamed=reference is not None)}
        return save_tool_output(location, layers, metadata, save_dtype, lambda name, written: (
            f"converted {lora_name} exactly: {len(layers)} layers, {rank_text(written.layers)}; "
            f"saved as {name}{alias_text(aliases)}{unknown_text(unknown)}"))


class TriLoRAExportLoRA(OptionalLorasFileNode):
    @classmethod
    def define_schema(cls):
        return tool_schema(
            cls, "Export TriLoRA as LoRA (kohya)",
            "Writes a TriLoRA as a standard kohya LoRA/LoCon file (lora_up/lora_down/alpha, networks.lora "
            "metadata) with exactly the same weight change, for ComfyUI's stock Load LoRA, kohya's sd-scripts and "
            "other tools.",
            inputs=[
                file_choice("trilora_name", "The TriLoRA file to export, from your loras folder. Ignored when "
                            "the trilora input is connected.", none=True),
                prefix_input("trilora/lora"),
                dtype_input("fp32", EXACT_DTYPE),
                optional_trilora_input("An in-memory TriLoRA to export instead of a file."),
                *reference_inputs("kohya sd-scripts' names (lora_unet_down_blocks_..., lora_te_...)"),
            ],
            outputs=[filename_output(),
                     info_output("How many layers were written, their ranks, and the naming used.")],
        )

    @classmethod
    def execute(cls, trilora_name, filename_prefix, save_dtype, trilora=None, model=None, clip=None):
        node = cls.__name__
        folder, base = prefix_location(filename_prefix, node)
        label, source = read_source(node, trilora_name, trilora)
        reference = reference_key_map(model, clip)
        layers, unknown, aliases = renamed(node, source.layers, reference, kohya=True)
        meta = lora_metadata(layers, carried_metadata(source.metadata), base,
                             f"exported from the TriLoRA {label} by comfyui-trilora (same weight change)")
        meta.update(tool_args("export", source=label, renamed=reference is not None))
        try:
            data = lora_file_bytes(layers, meta, SAVE_DTYPES[save_dtype])
        except ValueError as err:  # a factor that does not fit in save_dtype
            raise ValueError(f"{node}: {err}") from None
        path = place_new_file(lambda tmp: atomic_write_bytes(tmp, data), folder, base)
        name = relative_name(path)
        log.info("TriLoRA %s exported as a LoRA to %s", label, path)
        naming = "kohya names from the connected model" if reference is not None else "names as in the source"
        info = (f"exported {label} as a kohya LoRA: {len(layers)} layers, {rank_text(layers)} ({naming}); "
                f"saved as {name}{alias_text(aliases)}{unknown_text(unknown)}")
        return io.NodeOutput(name, info)
