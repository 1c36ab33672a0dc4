"""Loader nodes: a TriLoRA file (or a plain LoRA/LoCon, converted exactly) onto MODEL and CLIP,
and ApplyTriLoRA, which puts an in-memory TriLoRA (e.g. from Train TriLoRA) on a model."""
from __future__ import annotations

import folder_paths
from comfy_api.latest import io

from ..trilora_core import (
    DepthLayout,
    TriLoRAFile,
    TriLoRAFileError,
    block_group,
    read_schedule,
    truncate,
    truncation_limits,
)
from .families import depth_layout_of, family_of
from .file_cache import load_cached
from .loras_folder import LorasFileNode
from .patching import apply_trilora
from .schema import TRILORA, energy_input, info_output, max_rank_input, slider_input, strength_input, trilora_file_input

INFO = "Which layers matched, their ranks, and the file keys that matched nothing in this model."


def patched_io(clip: bool) -> tuple[list, list]:
    """The model (and CLIP) inputs a loader patches, and its outputs: them patched, and info."""
    inputs = [io.Model.Input(id="model", tooltip="The diffusion model the TriLoRA is applied to.")]
    outputs = [io.Model.Output(display_name="MODEL", tooltip="The diffusion model with the TriLoRA applied.")]
    if clip:
        inputs.append(io.Clip.Input(id="clip", tooltip="The text encoder (CLIP) the TriLoRA is applied to."))
        outputs.append(io.Clip.Output(display_name="CLIP", tooltip="The text encoder with the TriLoRA applied."))
    return inputs, [*outputs, info_output(INFO)]


def truncation_inputs() -> list:
    return [
        max_rank_input("Keep at most this many singular directions per layer, the strongest ones (least error "
                       "possible). 0 keeps them all.", optional=True),
        energy_input("Keep the fewest directions per layer that hold this share of the layer's energy (sum of "
                     "squared singular values). 1.0 keeps them all.", optional=True),
    ]


def load_onto(model, clip, trilora_name: str, strength_model: float, strength_clip: float, max_rank: int = 0,
              energy: float = 1.0, key_strength=None):
    """The loaders' one body: a file from the loras folder, layers truncated as asked, applied to
    ``model`` (and ``clip`` unless None) through apply_trilora. Returns (model, clip, report)."""
    path = folder_paths.get_full_path_or_raise("loras", trilora_name)
    read = load_cached(path)
    layers = read.layers
    schedule, off = file_schedule(path, read.metadata), ""
    if max_rank or energy < 1.0:
        layers = {p: truncate(layer, **truncation_limits(max_rank, energy)) for p, layer in layers.items()}
        off = "max_rank / energy re-sort the directions by strength"
    return apply_trilora(model, clip, layers, strength_model, strength_clip, path, key_strength=key_strength,
                         diffs=read.diffs, schedule=schedule, schedule_off=off)


def file_schedule(source: str, metadata: dict) -> tuple[int, float] | None:
    """T-LoRA's noise-level rank a file records (trilora_core.read_schedule), its error naming the file."""
    try:
        return read_schedule(metadata)
    except ValueError as err:
        raise TriLoRAFileError(source, None, str(err)) from None


class TriLoRALoader(LorasFileNode):
    @classmethod
    def define_schema(cls):
        inputs, outputs = patched_io(clip=True)
        return io.Schema(
            node_id="TriLoRALoader",
            display_name="Load TriLoRA",
            category="loaders",
            description="Applies a TriLoRA file to the diffusion model and the text encoder.",
            inputs=[
                *inputs,
                trilora_file_input(),
                strength_input("strength_model", "diffusion model"),
                strength_input("strength_clip", "text encoder"),
                *truncation_inputs(),
            ],
            outputs=outputs,
        )

    @classmethod
    def execute(cls, model, clip, trilora_name, strength_model, strength_clip, max_rank=0, energy=1.0):
        if strength_model == 0 and strength_clip == 0:
            return io.NodeOutput(model, clip, "strengths are 0: nothing applied")
        model, clip, report = load_onto(model, clip, trilora_name, strength_model, strength_clip, max_rank, energy)
        return io.NodeOutput(model, clip, report.summary())


class TriLoRALoaderModelOnly(LorasFileNode):
    @classmethod
    def define_schema(cls):
        inputs, outputs = patched_io(clip=False)
        return io.Schema(
            node_id="TriLoRALoaderModelOnly",
            display_name="Load TriLoRA (Model Only)",
            category="loaders",
            description="Applies a TriLoRA file to the diffusion model only; text-encoder layers are ignored.",
            inputs=[
                *inputs,
                trilora_file_input(),
                strength_input("strength_model", "diffusion model"),
                *truncation_inputs(),
            ],
            outputs=outputs,
        )

    @classmethod
    def execute(cls, model, trilora_name, strength_model, max_rank=0, energy=1.0):
        if strength_model == 0:
            return io.NodeOutput(model, "strength is 0: nothing applied")
        model, _, report = load_onto(model, None, trilora_name, strength_model, 0.0, max_rank, energy)
        return io.NodeOutput(model, report.summary())


BLOCK_MULTIPLIERS = (
    ("input_blocks", "UNet input blocks", "the UNet's input (down) blocks, or a transformer's first third of blocks "
                     "(Flux: the double blocks): composition and coarse shapes"),
    ("middle_block", "UNet middle block", "the UNet's middle block, or a transformer's middle third of blocks "
                     "(Flux: single blocks 0-18): the most abstract features"),
    ("output_blocks", "UNet output blocks", "the UNet's output (up) blocks, or a transformer's last third of blocks "
                      "(Flux: single blocks 19-37): details, texture and colour"),
    ("text_encoder", "Text encoder", "the text encoder(s): how the prompt's words are read"),
)


def block_multiplier_input(name: str, what: str) -> io.Float.Input:
    return slider_input(name, f"Multiplier on the strength for {what}. 1.0 = as the strength says, 0 = leave "
                              f"these layers out, negative = push the other way.")


def block_strength(multipliers: dict[str, float], layout: DepthLayout | None = None):
    """key_strength for apply_trilora: a multiplier per block group (UNet blocks, or a transformer's
    blocks by depth in ``layout``), one for the text encoder; layers outside the three block
    groups (time embedding, embedders, final layer) keep strength_model alone."""
    by_group = {group: multipliers[name] for name, group, _ in BLOCK_MULTIPLIERS[:3]}

    def key_strength(part: str, weight_key: str) -> float:
        if part == "CLIP":
            return multipliers["text_encoder"]
        return by_group.get(block_group(weight_key, layout), 1.0)

    return key_strength


def model_blocks(model) -> tuple[DepthLayout | None, str]:
    """(the model's DepthLayout or None for a UNet, which blocks the sliders move in words)."""
    layout = depth_layout_of(model)
    family = family_of(model).name
    if layout is None:
        return None, f"{family}: UNet input, middle and output blocks"
    return layout, f"{family}: {layout.describe()}"


class TriLoRALoaderBlockWeights(LorasFileNode):
    @classmethod
    def define_schema(cls):
        inputs, outputs = patched_io(clip=True)
        return io.Schema(
            node_id="TriLoRALoaderBlockWeights",
            display_name="Load TriLoRA (Block Weights)",
            category="loaders",
            description="Load TriLoRA with a strength per part of the model: UNet input, middle and output "
                        "blocks (for Flux, SD3, Wan, Qwen-Image and Lumina: the first, middle and last third of "
                        "the transformer blocks) and the text encoder, to choose where a style acts. The info "
                        "output says which blocks each slider moves in the model it sees.",
            inputs=[
                *inputs,
                trilora_file_input(),
                strength_input("strength_model", "diffusion model"),
                strength_input("strength_clip", "text encoder"),
                *[block_multiplier_input(name, what) for name, _, what in BLOCK_MULTIPLIERS],
                *truncation_inputs(),
            ],
            outputs=outputs,
        )

    @classmethod
    def execute(cls, model, clip, trilora_name, strength_model, strength_clip, input_blocks=1.0, middle_block=1.0,
                output_blocks=1.0, text_encoder=1.0, max_rank=0, energy=1.0):
        multipliers = {"input_blocks": input_blocks, "middle_block": middle_block, "output_blocks": output_blocks,
                       "text_encoder": text_encoder}
        if strength_model == 0 and strength_clip == 0:
            return io.NodeOutput(model, clip, "strengths are 0: nothing applied")
        layout, blocks = model_blocks(model)
        model, clip, report = load_onto(model, clip, trilora_name, strength_model, strength_clip, max_rank, energy,
                                        key_strength=block_strength(multipliers, layout))
        weights = ", ".join(f"{name} {value:g}" for name, value in multipliers.items())
        return io.NodeOutput(model, clip, f"{report.summary()}; {blocks}; block weights: {weights}")


class ApplyTriLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ApplyTriLoRA",
            display_name="Apply TriLoRA",
            category="training",
            description="Applies an in-memory TriLoRA (e.g. straight from Train TriLoRA) to a diffusion model, to "
                        "preview it without saving.",
            inputs=[
                io.Model.Input(id="model", tooltip="The diffusion model the TriLoRA is applied to."),
                TRILORA.Input(id="trilora", tooltip="The TriLoRA, e.g. the TRILORA output of Train TriLoRA."),
                slider_input("strength", "How strongly to modify the diffusion model: 1.0 applies the TriLoRA as "
                                         "trained, 0 leaves the model untouched, negative values push the other way."),
            ],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="The diffusion model with the TriLoRA applied.")],
        )

    @classmethod
    def execute(cls, model, trilora, strength):
        if not isinstance(trilora, TriLoRAFile) or not trilora.layers:
            raise ValueError("ApplyTriLoRA: trilora holds no layers; connect the TRILORA output of Train TriLoRA")
        if strength == 0:
            return io.NodeOutput(model)
        source = "TRILORA (in memory)"
        out, _, _ = apply_trilora(model, None, trilora.layers, strength, 0.0, source,
                                  schedule=file_schedule(source, trilora.metadata))
        return io.NodeOutput(out)


NODES = [TriLoRALoader, TriLoRALoaderModelOnly, TriLoRALoaderBlockWeights, ApplyTriLoRA]
