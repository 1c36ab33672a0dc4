"""The model family table: everything the pack knows per family, in one place. Its name, the
base-model metadata kohya-style tools read (``ss_base_model_version``, ``modelspec.architecture``),
its transformer block lists in forward order (the block-weight sliders' thirds), the layers that
carry attention where a name does not say so, and whether its blocks add in place. The layer
names that say "attention" or "feed-forward" in any family are here too (the target_layers presets).

Adding a family: docs/architecture.md, "Adding a model family".

A family is found from ComfyUI's detected model config (``model.model_config``), walking its
class's bases so that variants (FluxSchnell, WAN21_I2V, ZImage ...) find their own entry first
and their parent's otherwise. A config the table does not know still gets metadata: its class
name, lower-cased, so a file always says what it was trained on.

Architecture ids follow the Stability model spec as kohya sd-scripts (SD, SDXL, SD3, Flux,
Lumina 2) and musubi-tuner (Wan, HunyuanVideo, Qwen-Image) write them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..trilora_core import DepthLayout, depth_layout


@dataclass(frozen=True)
class Family:
    name: str  # as users call it, shown by the nodes
    base_model_version: str  # ss_base_model_version
    architecture: str  # modelspec.architecture, without the "/lora" suffix
    # Fused layers that carry attention although their name does not say so: Flux-style
    # single-stream blocks compute q, k, v and the MLP's input in one linear1 and take the
    # attention output and the MLP's output through one linear2.
    fused_attention: re.Pattern | None = None
    # Blocks that add their residuals in place (ComfyUI's Flux layers: ``x += ...`` after a norm
    # kept x for the backward pass): they train only with their activations recomputed.
    inplace_blocks: bool = False
    # A transformer's block lists under the diffusion model, in forward order (double-stream
    # before single-stream), and lists that run before them; empty for a UNet.
    block_lists: tuple[str, ...] = ()
    early_blocks: tuple[str, ...] = ()


_SINGLE_STREAM = re.compile(r"(^|\.)single_blocks\.\d+\.linear[12]$")
_FLUX_BLOCKS = ("double_blocks", "single_blocks")
_LUMINA = dict(block_lists=("layers",), early_blocks=("noise_refiner", "context_refiner"))

# Layer names that mean attention / feed-forward across ComfyUI's families (UNet to_q ... to_out,
# DiT qkv / proj, Wan self_attn / cross_attn, LLM-style q_proj ... o_proj; ff, mlp, fc1, w1 ...).
ATTENTION_NAMES = re.compile(r"(^|[._])(attn\w*|attention\w*|self_attn|cross_attn|to_q|to_k|to_v|to_out|to_qkv|qkv|"
                             r"q_proj|k_proj|v_proj|o_proj|out_proj|query|key|value)([._]|$)")
FEEDFORWARD_NAMES = re.compile(r"(^|[._])(ff\w*|mlp\w*|feed_forward|feedforward|fc1|fc2|w1|w2|w3|gate_proj|up_proj|"
                               r"down_proj)([._]|$)")

FAMILIES = {
    "SD15": Family("SD 1.5", "sd_v1", "stable-diffusion-v1"),
    "SD20": Family("SD 2.x", "sd_v2", "stable-diffusion-v2-512"),
    "SDXL": Family("SDXL", "sdxl_base_v1-0", "stable-diffusion-xl-v1-base"),
    "SDXLRefiner": Family("SDXL refiner", "sdxl_refiner_v1-0", "stable-diffusion-xl-v1-refiner"),
    "SD3": Family("SD3", "sd3", "stable-diffusion-3-medium", block_lists=("joint_blocks",)),
    "AuraFlow": Family("AuraFlow", "auraflow", "auraflow", block_lists=("double_layers", "single_layers")),
    "Flux": Family("Flux", "flux1", "flux-1-dev", _SINGLE_STREAM, True, _FLUX_BLOCKS),
    "FluxSchnell": Family("Flux schnell", "flux1", "flux-1-schnell", _SINGLE_STREAM, True, _FLUX_BLOCKS),
    "Chroma": Family("Chroma", "chroma", "chroma", _SINGLE_STREAM, True, _FLUX_BLOCKS),
    "HunyuanVideo": Family("HunyuanVideo", "hunyuan_video", "hunyuan-video", _SINGLE_STREAM, True, _FLUX_BLOCKS),
    "Lumina2": Family("Lumina 2", "lumina2", "lumina-2", **_LUMINA),
    "ZImage": Family("Z-Image", "z_image", "z-image", **_LUMINA),
    "WAN21_T2V": Family("Wan 2.1", "wan21", "wan2.1", block_lists=("blocks",)),
    "WAN22_T2V": Family("Wan 2.2", "wan22", "wan2.2", block_lists=("blocks",)),
    "QwenImage": Family("Qwen-Image", "qwen_image", "Qwen-Image", block_lists=("transformer_blocks",)),
    "HiDream": Family("HiDream", "hidream", "hidream-i1", block_lists=("double_stream_blocks", "single_stream_blocks")),
}
# A family the table does not know: every block list the table names, double-stream lists first.
_ANY_BLOCKS = tuple(dict.fromkeys(sorted((n for f in FAMILIES.values() for n in f.block_lists),
                                         key=lambda n: not n.startswith(("double", "joint")))))
_ANY_EARLY = tuple(dict.fromkeys(n for f in FAMILIES.values() for n in f.early_blocks))


def config_of(model_patcher):
    return getattr(getattr(model_patcher, "model", None), "model_config", None)


def family_of(model_patcher) -> Family:
    """The Family of a ComfyUI MODEL (a ModelPatcher); a generic one named after its config
    class when the table does not know it."""
    config = config_of(model_patcher)
    for cls in type(config).__mro__:
        if cls.__name__ in FAMILIES:
            return FAMILIES[cls.__name__]
    name = type(config).__name__
    return Family(name, name.lower(), name.lower(), block_lists=_ANY_BLOCKS, early_blocks=_ANY_EARLY)


def depth_layout_of(model_patcher) -> DepthLayout | None:
    """The model's transformer blocks by depth (its family's block lists); None for a UNet."""
    family = family_of(model_patcher)
    return depth_layout((name for name, _ in model_patcher.model.named_parameters()), family.block_lists,
                        family.early_blocks)


def base_model_metadata(model_patcher) -> dict[str, str]:
    """``ss_base_model_version``, ``modelspec.architecture`` (``<arch>/lora``) and
    ``modelspec.sai_model_spec`` for a file trained on this model."""
    family = family_of(model_patcher)
    arch = family.architecture
    model_type = str(getattr(model_patcher.model, "model_type", ""))
    unet_config = getattr(config_of(model_patcher), "unet_config", {}) or {}
    if family.base_model_version == "sd_v2" and model_type.endswith("V_PREDICTION"):
        arch = "stable-diffusion-v2-768-v"
    elif family.base_model_version == "sd3" and unet_config.get("qk_norm"):  # SD3.5 added q/k norms
        arch = "stable-diffusion-3.5-medium" if unet_config.get("x_block_self_attn_layers") else "stable-diffusion-3.5-large"
    return {"ss_base_model_version": family.base_model_version, "modelspec.architecture": f"{arch}/lora",
            "modelspec.sai_model_spec": "1.0.0"}
