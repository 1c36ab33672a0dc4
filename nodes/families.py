"""What the pack knows per model family: its name, the base-model metadata kohya-style tools
read (``ss_base_model_version``, ``modelspec.architecture``), and the layers that carry
attention where a name does not say so.

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


_SINGLE_STREAM = re.compile(r"(^|\.)single_blocks\.\d+\.linear[12]$")

FAMILIES = {
    "SD15": Family("SD 1.5", "sd_v1", "stable-diffusion-v1"),
    "SD20": Family("SD 2.x", "sd_v2", "stable-diffusion-v2-512"),
    "SDXL": Family("SDXL", "sdxl_base_v1-0", "stable-diffusion-xl-v1-base"),
    "SDXLRefiner": Family("SDXL refiner", "sdxl_refiner_v1-0", "stable-diffusion-xl-v1-refiner"),
    "SD3": Family("SD3", "sd3", "stable-diffusion-3-medium"),
    "AuraFlow": Family("AuraFlow", "auraflow", "auraflow"),
    "Flux": Family("Flux", "flux1", "flux-1-dev", _SINGLE_STREAM, inplace_blocks=True),
    "FluxSchnell": Family("Flux schnell", "flux1", "flux-1-schnell", _SINGLE_STREAM, inplace_blocks=True),
    "Chroma": Family("Chroma", "chroma", "chroma", _SINGLE_STREAM, inplace_blocks=True),
    "HunyuanVideo": Family("HunyuanVideo", "hunyuan_video", "hunyuan-video", _SINGLE_STREAM, inplace_blocks=True),
    "Lumina2": Family("Lumina 2", "lumina2", "lumina-2"),
    "ZImage": Family("Z-Image", "z_image", "z-image"),
    "WAN21_T2V": Family("Wan 2.1", "wan21", "wan2.1"),
    "WAN22_T2V": Family("Wan 2.2", "wan22", "wan2.2"),
    "QwenImage": Family("Qwen-Image", "qwen_image", "Qwen-Image"),
    "HiDream": Family("HiDream", "hidream", "hidream-i1"),
}


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
    return Family(name, name.lower(), name.lower())


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
