"""The exact conversions: any LoRA/LoCon file to a canonical TriLoRA (Convert), and a TriLoRA to a
LoRA/LoCon file in kohya's, diffusers/PEFT's or ComfyUI's own names (Export). Both keep the weight
change exactly; with a reference model connected, layer names are rewritten to the pack's or the
format's names for that model (trilora_core.key_map)."""
from __future__ import annotations

import logging

from comfy_api.latest import io

from ...trilora_core import (
    KOHYA,
    PEFT,
    atomic_write_bytes,
    comfyui_prefixes,
    diffusers_prefixes,
    kohya_prefixes,
    layers_by_weight,
    lora_file_bytes,
    lora_metadata,
    prefixes_by_weight,
    rename_layers,
    split_rows,
    unit_scale,
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

# Export formats: kohya (lora_unet_/lora_te_ + lora_up/lora_down/alpha), diffusers/PEFT (unet./
# transformer./text_encoder. + lora_A/lora_B, scale 1: what load_lora_weights reads and ai-toolkit
# and SimpleTuner write) and ComfyUI's own names (diffusion_model./text_encoders. + lora_up/
# lora_down/alpha, as its Train LoRA writes them).
KOHYA_FORMAT, DIFFUSERS_FORMAT, COMFYUI_FORMAT = "kohya", "diffusers / PEFT", "ComfyUI"
EXPORT_FORMATS = (KOHYA_FORMAT, DIFFUSERS_FORMAT, COMFYUI_FORMAT)


def renamed(node: str, layers: dict, reference: tuple[dict, dict] | None, kohya: bool):
    """trilora_core.rename_layers under the reference model's names (the pack's, or kohya's);
    its ValueError gets the node's name."""
    key_map, shapes = reference if reference is not None else (None, {})
    names = {} if key_map is None else kohya_prefixes(key_map) if kohya else prefixes_by_weight(key_map)
    try:
        return rename_layers(layers, key_map, shapes, names)
    except ValueError as err:
        raise ValueError(f"{node}: {err}") from None


def export_layers(node: str, layers: dict, reference: tuple[dict, dict] | None, format: str):
    """(layers under the format's names, factor naming, unknown prefixes, alias groups). The
    diffusers and ComfyUI names come from the connected model's key map; a layer it does not know
    is refused there (kohya keeps its name), so a file never mixes namings."""
    if format == KOHYA_FORMAT:
        named, unknown, aliases = renamed(node, layers, reference, kohya=True)
        return named, KOHYA, unknown, aliases
    if reference is None:
        raise ValueError(f"{node}: format {format!r} takes its layer names from the model: connect the model (and "
                         "the clip, for text-encoder layers) the adapter was made for")
    key_map, shapes = reference
    try:
        resolved = layers_by_weight(layers, key_map, shapes)
    except ValueError as err:
        raise ValueError(f"{node}: {err}; was the adapter made for another base model?") from None
    names = diffusers_prefixes(key_map) if format == DIFFUSERS_FORMAT else comfyui_prefixes(key_map)
    nameless = resolved.unknown + sorted(w for w in resolved.layers if w not in names)
    if nameless:
        raise ValueError(f"{node}: {len(nameless)} layers have no {format} name in the connected model (first: "
                         f"{nameless[0]}); connect the model and clip the adapter was made for, or export as kohya")
    aliases = list(resolved.aliases().values())
    if format == COMFYUI_FORMAT:
        return {names[w]: layer for w, layer in sorted(resolved.layers.items())}, KOHYA, [], aliases
    out = {}
    for weight, layer in sorted(resolved.layers.items()):
        try:
            out.update(split_rows(unit_scale(layer), names[weight], weight))
        except ValueError as err:
            raise ValueError(f"{node}: {err}; export as kohya or ComfyUI instead") from None
    return dict(sorted(out.items())), PEFT, [], aliases


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
            cls, "Export TriLoRA as LoRA",
            "Writes a TriLoRA as a standard LoRA/LoCon file with exactly the same weight change: kohya's names "
            "(lora_up/lora_down/alpha, networks.lora metadata) for ComfyUI's stock Load LoRA, kohya's sd-scripts "
            "and other tools; diffusers/PEFT names for diffusers' load_lora_weights and PEFT; or ComfyUI's own "
            "diffusion_model. names.",
            inputs=[
                file_choice("trilora_name", "The TriLoRA file to export, from your loras folder. Ignored when "
                            "the trilora input is connected.", none=True),
                prefix_input("trilora/lora"),
                dtype_input("fp32", EXACT_DTYPE),
                optional_trilora_input("An in-memory TriLoRA to export instead of a file."),
                *reference_inputs("the format's names (kohya: lora_unet_down_blocks_..., lora_te_...)"),
                io.Combo.Input(
                    id="format", options=list(EXPORT_FORMATS), default=KOHYA_FORMAT, optional=True,
                    tooltip="kohya: lora_unet_/lora_te_ names with lora_up/lora_down/alpha (kohya sd-scripts, "
                            "ComfyUI). diffusers / PEFT: unet./transformer./text_encoder. module "
                            "names with lora_A/lora_B and no alpha (scale 1), as diffusers' load_lora_weights "
                            "and PEFT read them and ai-toolkit and SimpleTuner write them. ComfyUI: "
                            "diffusion_model./text_encoders. names, as ComfyUI's Train LoRA writes them. The "
                            "last two need the model (and clip) connected: the names are that model's."),
            ],
            outputs=[filename_output(),
                     info_output("How many layers were written, their ranks, and the naming used.")],
        )

    @classmethod
    def execute(cls, trilora_name, filename_prefix, save_dtype, trilora=None, model=None, clip=None,
                format=KOHYA_FORMAT):
        node = cls.__name__
        folder, base = prefix_location(filename_prefix, node)
        label, source = read_source(node, trilora_name, trilora)
        reference = reference_key_map(model, clip)
        layers, naming, unknown, aliases = export_layers(node, source.layers, reference, format)
        meta = lora_metadata(layers, carried_metadata(source.metadata), base,
                             f"exported from the TriLoRA {label} by comfyui-trilora (same weight change)")
        meta.update(tool_args("export", source=label, renamed=reference is not None, format=format))
        try:
            data = lora_file_bytes(layers, meta, SAVE_DTYPES[save_dtype], naming)
        except ValueError as err:  # a factor that does not fit in save_dtype
            raise ValueError(f"{node}: {err}") from None
        path = place_new_file(lambda tmp: atomic_write_bytes(tmp, data), folder, base)
        name = relative_name(path)
        log.info("TriLoRA %s exported as a %s LoRA to %s", label, format, path)
        naming_text = (f"{format} names from the connected model" if reference is not None
                       else "names as in the source")
        info = (f"exported {label} as a {format} LoRA: {len(layers)} layers, {rank_text(layers)} ({naming_text}); "
                f"saved as {name}{alias_text(aliases)}{unknown_text(unknown)}")
        return io.NodeOutput(name, info)
