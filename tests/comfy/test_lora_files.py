"""LoRA files as users bring them (kohya, diffusers/PEFT, LyCORIS/SimpleTuner, OneTrainer,
ComfyUI's own trainer; fp32 to fp8), loaded by the pack in the real ComfyUI and compared with what
ComfyUI's own LoraLoader patches; resumed by TrainTriLoRA; merged; refused with the kind named.
The failing inputs of issue 13 are here with their right values."""
from __future__ import annotations

import comfy.lora
import pytest
import torch
from conftest import run_node
from safetensors.torch import save_file
from trilora_files import LAYERS, weight, weights_restored

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
SUFFIXES = {  # the LoRA factor namings ComfyUI's LoRA adapter reads: (up, down)
    "lora_up": (".lora_up.weight", ".lora_down.weight"),
    "lora_B": (".lora_B.weight", ".lora_A.weight"),
    "lora.up": (".lora.up.weight", ".lora.down.weight"),
    "processor": ("_lora.up.weight", "_lora.down.weight"),
    "lora_linear_layer": (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
    "lora_B.default": (".lora_B.default.weight", ".lora_A.default.weight"),
    "mochi": (".lora_B", ".lora_A"),
}


def _kohya_native(weight_key: str) -> str:
    return "lora_unet_" + weight_key.removeprefix("diffusion_model.").removesuffix(".weight").replace(".", "_")


# Prefix conventions, each picking the alias ComfyUI's own key map has for a weight.
PREFIXES = {
    "kohya": lambda a, w: a.startswith(("lora_unet_", "lora_te_")) and a != _kohya_native(w),
    "kohya_native": lambda a, w: a == _kohya_native(w) or a.startswith("lora_te_"),
    "lycoris": lambda a, w: a.startswith(("lycoris_", "lora_te_")),
    "comfyui": lambda a, w: a.startswith(("diffusion_model.", "text_encoders.")),
    "diffusers": lambda a, w: a.startswith(("unet.", "text_encoder.")),
}
# (prefix convention, factor naming): every convention and every naming at least once, as trainers write them.
NAMINGS = [
    ("kohya", "lora_up"), ("kohya_native", "lora_up"), ("lycoris", "lora_up"), ("comfyui", "lora_up"),
    ("comfyui", "lora_B"), ("diffusers", "lora_B"), ("diffusers", "lora.up"), ("diffusers", "processor"),
    ("diffusers", "lora_linear_layer"), ("comfyui", "lora_B.default"), ("comfyui", "mochi"),
]


@pytest.fixture(autouse=True)
def unload_after(tiny):
    yield from weights_restored(tiny)


@pytest.fixture(scope="module")
def key_maps(tiny):
    return {"unet": comfy.lora.model_lora_keys_unet(tiny.model.model, {}),
            "clip": comfy.lora.model_lora_keys_clip(tiny.clip.cond_stage_model, {})}


def prefix_in(key_maps, convention: str, part: str, weight_key: str) -> str:
    aliases = sorted(a for a, v in key_maps[part].items() if v == weight_key and PREFIXES[convention](a, weight_key))
    assert aliases, (convention, weight_key)
    return aliases[0]


def lora_tensors(tiny, key_maps, convention, naming, dtype, rank=3, alpha=1.5, seed=0, layers=LAYERS):
    """{file key: tensor} of a random LoRA over ``layers`` in one naming, factors and alpha in
    ``dtype`` (alpha as a one-element [1] tensor for float8, a scalar otherwise)."""
    g = torch.Generator().manual_seed(seed)
    up_suffix, down_suffix = SUFFIXES[naming]
    tensors = {}
    for part, key in layers.values():
        shape = weight(tiny, part, key).shape
        prefix = prefix_in(key_maps, convention, part, key)
        tensors[prefix + up_suffix] = (torch.randn(shape[0], rank, *([1] * (len(shape) - 2)), generator=g) * 0.1).to(dtype)
        tensors[prefix + down_suffix] = (torch.randn(rank, *shape[1:], generator=g) * 0.1).to(dtype)
        if alpha is not None:
            tensors[prefix + ".alpha"] = torch.tensor([alpha] if dtype.itemsize == 1 else alpha).to(dtype)
    return tensors


def computed(patcher, key: str) -> torch.Tensor:
    """The weight ``key`` as ComfyUI's ModelPatcher computes it when it loads the model (its
    comfy.lora.calculate_weight over the patches, in float32), without loading the whole model."""
    original = patcher.model.state_dict()[key]
    return comfy.lora.calculate_weight(patcher.patches.get(key, []), original.float().clone(), key)


def computed_weights(model, clip, keys=None) -> dict[str, torch.Tensor]:
    """{prefix or key: float32 weight} for LAYERS (or the given (part, key) pairs) on these patchers."""
    out = {}
    for name, (part, key) in (keys or LAYERS).items():
        out[name] = computed(model if part == "unet" else clip.patcher, key)
    return out


def lora_loader_weights(comfy_host, tiny, name, strength_model=1.0, strength_clip=1.0, keys=None):
    model, clip = comfy_host.nodes.LoraLoader().load_lora(tiny.model, tiny.clip, name, strength_model, strength_clip)
    return computed_weights(model, clip, keys)


def assert_same_weights(got, want, only=None):
    for prefix in only or want:
        torch.testing.assert_close(got[prefix], want[prefix], rtol=1e-5, atol=1e-6,
                                   msg=lambda m, p=prefix: f"{p}: {m}")


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("convention, naming", NAMINGS)
def test_every_naming_and_dtype_loads_as_lora_loader_patches_it(comfy_host, tiny, key_maps, unload_after,
                                                                convention, naming, dtype):
    name = f"table_{convention}_{naming}_{dtype}.safetensors"
    save_file(lora_tensors(tiny, key_maps, convention, naming, DTYPES[dtype]), str(comfy_host.loras / name))
    want = lora_loader_weights(comfy_host, tiny, name)
    assert not any(torch.equal(want[p], unload_after[k].float()) for p, (_, k) in LAYERS.items()), "LoraLoader: no change"
    model, clip, info = run_node(comfy_host, "TriLoRALoader", model=tiny.model, clip=tiny.clip, trilora_name=name,
                                 strength_model=1.0, strength_clip=1.0)
    assert "5 of 5 layers matched (UNet 4, CLIP 1); rank 3" in info, info
    assert_same_weights(computed_weights(model, clip), want)
