"""TriLoRA and LoRA files made for the tiny checkpoint, and the weights they should give."""
from __future__ import annotations

import comfy.model_management as mm
import comfy.utils
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


def weights_restored(tiny):
    """Generator for a fixture: yields the LAYERS weights as they are, and after the test unloads
    every model and checks that the shared model is as it was, bit for bit."""
    originals = {key: weight(tiny, part, key).clone() for part, key in LAYERS.values()}
    yield originals
    mm.unload_all_models()
    for part, key in LAYERS.values():
        assert torch.equal(weight(tiny, part, key), originals[key]), f"{key} not restored"


def patched_weights(model, clip):
    """Loads the patchers as ComfyUI does before sampling and reads the weights it computed."""
    mm.load_models_gpu([p for p in (model, clip and clip.patcher) if p is not None])
    out = {}
    for prefix, (part, key) in LAYERS.items():
        holder = model.model if part == "unet" else clip.cond_stage_model
        out[prefix] = comfy.utils.get_attr(holder, key).detach().clone()
    return out


def tolerance(dtype) -> dict:
    """fp32 weights: float rounding only. fp16 weights (the CPU text encoder): ComfyUI casts the
    patched weight back with stochastic rounding, one unit in the last place either way."""
    return dict(rtol=1e-3, atol=1e-5) if dtype == torch.float16 else dict(rtol=1e-5, atol=1e-6)


def assert_patched(got, originals, layers, strength_model, strength_clip=None):
    """Every LAYERS weight is W + strength (alpha / r) U diag(s) Vt (strength_clip defaults to strength_model)."""
    for prefix, (part, key) in LAYERS.items():
        strength = strength_model if part == "unet" or strength_clip is None else strength_clip
        want = expected_weight(originals[key], layers[prefix], strength)
        torch.testing.assert_close(got[prefix], want, **tolerance(want.dtype), msg=lambda m, p=prefix: f"{p}: {m}")
