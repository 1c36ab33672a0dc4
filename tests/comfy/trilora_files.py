"""TriLoRA and LoRA files made for the tiny checkpoint, and the weights they should give."""
from __future__ import annotations

import torch
from safetensors.torch import save_file

# file prefix -> (model part, weight key in that part's module): linear, non-square linear,
# 3x3 conv and 1x1 conv in the UNet, and a text-encoder linear.
LAYERS = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
        ("unet", "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k":
        ("unet", "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"),
    "lora_unet_down_blocks_0_resnets_0_conv1":
        ("unet", "diffusion_model.input_blocks.1.0.in_layers.2.weight"),
    "lora_unet_down_blocks_0_attentions_0_proj_in":
        ("unet", "diffusion_model.input_blocks.1.1.proj_in.weight"),
    "lora_te_text_model_encoder_layers_0_mlp_fc1":
        ("clip", "clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight"),
}


def module_of(tiny, part):
    return tiny.model.model if part == "unet" else tiny.clip.cond_stage_model


def weight(tiny, part, key) -> torch.Tensor:
    return module_of(tiny, part).state_dict()[key]


def random_layers(core, tiny, rank=4, seed=0, alpha=None):
    """Non-canonical random factors (the writer canonicalises them) for every LAYERS entry."""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for prefix, (part, key) in LAYERS.items():
        shape = weight(tiny, part, key).shape
        u = torch.randn(shape[0], rank, generator=g) * 0.1
        vt = torch.randn(rank, *shape[1:], generator=g) * 0.1
        s = torch.rand(rank, generator=g) + 0.5
        layers[prefix] = core.TriLoRALayer(u, s, vt, float(alpha if alpha is not None else rank / 2))
    return layers


def expected_weight(original: torch.Tensor, layer, strength: float) -> torch.Tensor:
    """W + strength * (alpha / r) * U diag(s) Vt, in float64."""
    delta = (layer.u.double() * layer.s.double()) @ layer.vt.double().flatten(1)
    return (original.double() + strength * layer.alpha / layer.rank * delta.reshape(original.shape)).to(original.dtype)


def write_lora(path, layers_updown: dict):
    """A kohya LoRA/LoCon file: {prefix: (up, down, alpha)}."""
    tensors = {}
    for prefix, (up, down, alpha) in layers_updown.items():
        tensors[f"{prefix}.lora_up.weight"] = up.contiguous()
        tensors[f"{prefix}.lora_down.weight"] = down.contiguous()
        tensors[f"{prefix}.alpha"] = torch.tensor(float(alpha))
    save_file(tensors, str(path))
