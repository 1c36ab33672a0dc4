"""Which part of the model an adapted weight belongs to: UNet input / middle / output blocks, the
rest of the UNet, or a text encoder. Works on file prefixes in any naming ComfyUI reads (kohya
`lora_unet_input_blocks_...` or `lora_unet_down_blocks_...`, generic `diffusion_model....`,
diffusers `unet.down_blocks....`, `lora_te_...`, `text_encoders....`) and on model weight keys."""
from __future__ import annotations

INPUT = "UNet input blocks"
MIDDLE = "UNet middle block"
OUTPUT = "UNet output blocks"
UNET_OTHER = "UNet other"
TEXT_ENCODER = "Text encoder"
TEXT_ENCODER_2 = "Text encoder 2"
TEXT_ENCODER_3 = "Text encoder 3"
OTHER = "Other"
GROUPS = (INPUT, MIDDLE, OUTPUT, UNET_OTHER, TEXT_ENCODER, TEXT_ENCODER_2, TEXT_ENCODER_3, OTHER)
UNET_BLOCKS = (INPUT, MIDDLE, OUTPUT)
TEXT_ENCODERS = (TEXT_ENCODER, TEXT_ENCODER_2, TEXT_ENCODER_3)

_TE3 = ("lora_te3_", "text_encoders.t5xxl.", "t5xxl.", "text_encoder_3.")
_TE2 = ("lora_te2_", "text_encoder_2.", "text_encoders.clip_g.", "clip_g.")
_TE = ("lora_te_", "lora_te1_", "lora_prior_te_", "text_encoder.", "text_encoders.", "clip_l.", "clip_h.")
_UNET = ("lora_unet_", "lora_prior_unet_", "lycoris_", "model.diffusion_model.", "diffusion_model.", "unet.",
         "base_model.model.", "transformer.")
_INPUT = ("input_blocks_", "down_blocks_", "conv_in_")
_MIDDLE = ("middle_block_", "mid_block_")
_OUTPUT = ("output_blocks_", "up_blocks_", "out_", "conv_out_", "conv_norm_out_")


def block_group(name: str) -> str:
    """The group (one of GROUPS) of a file prefix or a model weight key."""
    for prefixes, group in ((_TE3, TEXT_ENCODER_3), (_TE2, TEXT_ENCODER_2), (_TE, TEXT_ENCODER)):
        if name.startswith(prefixes):
            return group
    rest, unet = name, False
    for prefix in _UNET:
        if rest.startswith(prefix):
            rest, unet = rest[len(prefix):], True
            break
    flat = rest.replace(".", "_") + "_"
    if flat.startswith(_INPUT):
        return INPUT
    if flat.startswith(_MIDDLE):
        return MIDDLE
    if flat.startswith(_OUTPUT):
        return OUTPUT
    return UNET_OTHER if unet else OTHER
