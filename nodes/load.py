"""Loader nodes: a TriLoRA (or a plain LoRA/LoCon, converted exactly) onto MODEL and CLIP."""
from __future__ import annotations

import folder_paths
from comfy_api.latest import io

from ..trilora_core import truncate
from .blocks import DepthLayout, block_group, depth_layout
from .families import family_of
from .file_cache import load_cached
from .loras_folder import LorasFileNode, file_choice
from .patching import apply_trilora

STRENGTH_LIMIT = 10.0


def slider_input(name: str, tooltip: str) -> io.Float.Input:
    return io.Float.Input(id=name, default=1.0, min=-STRENGTH_LIMIT, max=STRENGTH_LIMIT, step=0.01,
                          display_mode=io.NumberDisplay.slider, tooltip=tooltip)


def strength_input(name: str, what: str) -> io.Float.Input:
    return slider_input(name, f"How strongly to modify the {what}: 1.0 applies the adapter as trained, 0 leaves "
                              f"the {what} untouched, negative values push the other way.")


def targets(clip: bool) -> tuple[list, list]:
    """The model (and CLIP) inputs a loader patches, and its outputs: them patched, and info."""
    inputs = [io.Model.Input(id="model", tooltip="The diffusion model the TriLoRA is applied to.")]
    outputs = [io.Model.Output(display_name="MODEL", tooltip="The diffusion model with the TriLoRA applied.")]
    if clip:
        inputs.append(io.Clip.Input(id="clip", tooltip="The text encoder (CLIP) the TriLoRA is applied to."))
        outputs.append(io.Clip.Output(display_name="CLIP", tooltip="The text encoder with the TriLoRA applied."))
    return inputs, [*outputs, info_output()]


def file_input() -> io.Combo.Input:
    return file_choice("trilora_name", "A TriLoRA file from your loras folder. A standard LoRA/LoCon file works too: "
                       "it is converted exactly, so rank truncation applies to it as well.")


def truncation_inputs() -> list:
    return [
        io.Int.Input(id="max_rank", default=0, min=0, max=4096, optional=True,
                     tooltip="Keep at most this many singular directions per layer, the strongest ones "
                             "(least error possible). 0 keeps them all."),
        io.Float.Input(id="energy", default=1.0, min=0.01, max=1.0, step=0.01, optional=True,
                       tooltip="Keep the fewest directions per layer that hold this share of the layer's "
                               "energy (sum of squared singular values). 1.0 keeps them all."),
    ]


def load_layers(trilora_name: str, max_rank: int = 0, energy: float = 1.0):
    """(path, layers, full-weight diffs) of a file from the loras folder, layers truncated as asked."""
    path = folder_paths.get_full_path_or_raise("loras", trilora_name)
    read = load_cached(path)
    layers = read.layers
    if max_rank or energy < 1.0:
        layers = {p: truncate(layer, rank=max_rank or None, energy=energy if energy < 1.0 else None)
                  for p, layer in layers.items()}
    return path, layers, read.diffs


def info_output() -> io.String.Output:
    # A new object per schema with an explicit id: newer ComfyUI assigns ids to id-less outputs
    # in place, so one shared instance would carry another node's id.
    return io.String.Output(id="info", display_name="info", tooltip="Which layers matched, their ranks, "
                            "and the file keys that matched nothing in this model.")


class TriLoRALoader(LorasFileNode):
    @classmethod
    def define_schema(cls):
        inputs, outputs = targets(clip=True)
        return io.Schema(
            node_id="TriLoRALoader",
            display_name="Load TriLoRA",
            category="loaders",
            description="Applies a TriLoRA file to the diffusion model and the text encoder.",
            inputs=[
                *inputs,
                file_input(),
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
        path, layers, diffs = load_layers(trilora_name, max_rank, energy)
        model, clip, report = apply_trilora(model, clip, layers, strength_model, strength_clip, path, diffs=diffs)
        return io.NodeOutput(model, clip, report.summary())


class TriLoRALoaderModelOnly(LorasFileNode):
    @classmethod
    def define_schema(cls):
        inputs, outputs = targets(clip=False)
        return io.Schema(
            node_id="TriLoRALoaderModelOnly",
            display_name="Load TriLoRA (Model Only)",
            category="loaders",
            description="Applies a TriLoRA file to the diffusion model only; text-encoder layers are ignored.",
            inputs=[
                *inputs,
                file_input(),
                strength_input("strength_model", "diffusion model"),
                *truncation_inputs(),
            ],
            outputs=outputs,
        )

    @classmethod
    def execute(cls, model, trilora_name, strength_model, max_rank=0, energy=1.0):
        if strength_model == 0:
            return io.NodeOutput(model, "strength is 0: nothing applied")
        path, layers, diffs = load_layers(trilora_name, max_rank, energy)
        model, _, report = apply_trilora(model, None, layers, strength_model, 0.0, path, diffs=diffs)
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
    layout = depth_layout(name for name, _ in model.model.named_parameters())
    family = family_of(model).name
    if layout is None:
        return None, f"{family}: UNet input, middle and output blocks"
    return layout, f"{family}: {layout.describe()}"


class TriLoRALoaderBlockWeights(LorasFileNode):
    @classmethod
    def define_schema(cls):
        inputs, outputs = targets(clip=True)
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
                file_input(),
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
        path, layers, diffs = load_layers(trilora_name, max_rank, energy)
        layout, blocks = model_blocks(model)
        model, clip, report = apply_trilora(model, clip, layers, strength_model, strength_clip, path,
                                            key_strength=block_strength(multipliers, layout), diffs=diffs)
        weights = ", ".join(f"{name} {value:g}" for name, value in multipliers.items())
        return io.NodeOutput(model, clip, f"{report.summary()}; {blocks}; block weights: {weights}")


NODES = [TriLoRALoader, TriLoRALoaderModelOnly, TriLoRALoaderBlockWeights]
