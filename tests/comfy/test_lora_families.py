"""LoRA files in every naming ComfyUI's key maps know for each family's tiny fixture (SDXL,
SD3.5, Flux, Wan, Qwen-Image, Lumina 2, Z-Image): loaded by the pack as ComfyUI's LoraLoader
patches them (plain keys, slices of fused weights, keys with a function), resumed by TrainTriLoRA
from the exact delta, ComfyUI's own trained files and its key renames. Issue 13, inputs 6-9."""
from __future__ import annotations

import math

import comfy.lora
import pytest
import torch
from conftest import run_node
from safetensors.torch import save_file
from test_lora_files import SUFFIXES, computed, resumed_deltas
from tiny_models import FAMILIES, tiny_model

FAMILY_NAMES = [name for name in FAMILIES if name != "sd15"]  # SD1.5: test_lora_files.py
CONVENTIONS = {  # alias prefix -> the factor naming (test_lora_files.SUFFIXES) its trainers write
    "lora_unet_": SUFFIXES["lora_up"],
    "lycoris_": SUFFIXES["lora_up"],
    "lora_transformer_": SUFFIXES["lora_up"],
    "transformer.": SUFFIXES["lora_B"],
    "base_model.model.": SUFFIXES["lora_B"],
    "unet.": SUFFIXES["lora.up"],
    "diffusion_model.": SUFFIXES["lora_B"],
    "": SUFFIXES["lora_B.default"],  # bare names (Qwen-Image, diffusers SDXL)
}


def convention_of(alias: str) -> str:
    return next((p for p in CONVENTIONS if p and alias.startswith(p)), "")


def family_setup(comfy_host, name):
    tiny = tiny_model(name)
    key_map = comfy.lora.model_lora_keys_unet(tiny.model.model, {})
    shapes = {k: tuple(v.shape) for k, v in tiny.model.model.state_dict().items()}
    return tiny, key_map, shapes


def target(value):
    """(weight key, slice or None, function or None) of a key-map value in any of its forms."""
    if isinstance(value, str):
        return value, None, None
    return value[0], value[1] if len(value) > 1 else None, value[2] if len(value) > 2 else None


def pick_aliases(key_map, shapes, convention: str) -> list[str]:
    """In one convention: a whole 2-D+ weight, every slice of one fused weight, and a function entry."""
    chosen, sliced, seen = [], None, set()
    for alias in sorted(key_map):
        if convention_of(alias) != convention:
            continue
        weight, offset, function = target(key_map[alias])
        if weight not in shapes or len(shapes[weight]) < 2 or weight in seen:
            continue
        form = "function" if function is not None else "slice" if offset is not None else "plain"
        if form == "slice":
            sliced = sliced or weight
            if weight != sliced:
                continue
        elif form in {f for _, f in chosen}:
            continue
        chosen.append((alias, form))
        if form != "slice":
            seen.add(weight)
    return [a for a, _ in chosen]


def write_lora(path, key_map, shapes, aliases, suffixes, dtype=torch.float16, rank=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for alias in aliases:
        weight, offset, _ = target(key_map[alias])
        shape = list(shapes[weight])
        if offset is not None:
            shape[offset[0]] = offset[2]
        tensors[alias + suffixes[0]] = (torch.randn(shape[0], rank, generator=g) * 0.1).to(dtype)
        tensors[alias + suffixes[1]] = (torch.randn(rank, math.prod(shape[1:]), generator=g) * 0.1).to(dtype)
        tensors[alias + ".alpha"] = torch.tensor(2.0, dtype=dtype)
    save_file(tensors, str(path))


def weights_after(patcher, keys) -> dict[str, torch.Tensor]:
    return {k: computed(patcher, k) for k in keys}


def assert_as_lora_loader(comfy_host, tiny, name, keys, strength=0.8) -> str:
    """Loads ``name`` with LoraLoaderModelOnly and TriLoRALoaderModelOnly; the same weights. Returns info."""
    stock = comfy_host.nodes.LoraLoaderModelOnly().load_lora_model_only(tiny.model, name, strength)[0]
    want = weights_after(stock, keys)
    ours, info = run_node(comfy_host, "TriLoRALoaderModelOnly", model=tiny.model, trilora_name=name,
                          strength_model=strength)
    got = weights_after(ours, keys)
    for key in keys:
        assert not torch.equal(want[key], tiny.model.model.state_dict()[key].float()), f"LoraLoader left {key}"
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")
    return info


# The conventions each family's key map has (ComfyUI 0.3.75): every one is tested.
EXPECTED_CONVENTIONS = {
    "sdxl": {"lora_unet_", "lycoris_", "unet.", "diffusion_model.", ""},
    "sd3.5": {"lora_unet_", "lycoris_", "lora_transformer_", "transformer.", "base_model.model.", "diffusion_model."},
    "flux-dev": {"lora_unet_", "lycoris_", "lora_transformer_", "transformer.", "diffusion_model."},
    "wan2.1": {"lora_unet_", "diffusion_model."},
    "qwen-image": {"lora_unet_", "lycoris_", "transformer.", "diffusion_model.", ""},
    "lumina2": {"lora_unet_", "lycoris_", "diffusion_model."},
    "auraflow": {"lora_unet_", "transformer.", "diffusion_model."},
}


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_every_naming_of_every_family_loads_as_lora_loader_and_resumes(comfy_host, family):
    """Issue 13, inputs 6 and 7: in each naming the family's key map knows, plain, sliced and
    function entries load as LoraLoader patches them, and TrainTriLoRA starts from the delta
    ComfyUI patches (the file's exact delta)."""
    tiny, key_map, shapes = family_setup(comfy_host, family)
    conventions = [c for c in CONVENTIONS if pick_aliases(key_map, shapes, c)]
    assert EXPECTED_CONVENTIONS.get(family, set()) <= set(conventions), conventions
    core = comfy_host.core
    for convention in conventions:
        aliases = pick_aliases(key_map, shapes, convention)
        name = f"family_{family}_{convention.strip('._') or 'bare'}.safetensors"
        write_lora(comfy_host.loras / name, key_map, shapes, aliases, CONVENTIONS[convention])
        keys = sorted({target(key_map[a])[0] for a in aliases})
        info = assert_as_lora_loader(comfy_host, tiny, name, keys)
        assert f"{len(aliases)} of {len(aliases)} layers matched" in info, (convention, info)

        got = resumed_deltas(comfy_host, tiny.model, name)
        assert sorted(got) == keys, convention
        stock = comfy_host.nodes.LoraLoaderModelOnly().load_lora_model_only(tiny.model, name, 1.0)[0]
        want = core.layers_by_weight(core.read_adapter_file(str(comfy_host.loras / name)).layers, key_map, shapes)
        for key in keys:
            patched = computed(stock, key).double() - tiny.model.model.state_dict()[key].double()
            scale = float(patched.abs().max())
            torch.testing.assert_close(got[key], patched, rtol=1e-4, atol=1e-5 * scale, msg=lambda m, c=convention, k=key: f"{c} {k}: {m}")
            torch.testing.assert_close(got[key], want.layers[key].delta(torch.float64), rtol=1e-5, atol=1e-7 * scale)


def test_flux_norm_out_and_sd3_last_norm1_context_load(comfy_host):
    """Issue 13, input 6: ComfyUI maps these diffusers names with a function (swap_scale_shift);
    TriLoRALoader crashed on them with a TypeError."""
    for family, alias in (("flux-dev", "transformer.norm_out.linear"),
                          ("sd3.5", "transformer.transformer_blocks.1.norm1_context.linear")):
        tiny, key_map, shapes = family_setup(comfy_host, family)
        assert isinstance(key_map[alias], tuple) and len(key_map[alias]) == 3 and key_map[alias][1] is None
        name = f"function_{family}.safetensors"
        write_lora(comfy_host.loras / name, key_map, shapes, [alias], CONVENTIONS["transformer."], dtype=torch.bfloat16)
        info = assert_as_lora_loader(comfy_host, tiny, name, [key_map[alias][0]])
        assert "1 of 1 layers matched (UNet 1)" in info, info


def test_the_packs_own_export_resumes_on_sdxl(comfy_host):
    """Issue 13, input 7: Export (kohya names such as lora_unet_add_embedding_linear_1) and resume."""
    tiny, key_map, shapes = family_setup(comfy_host, "sdxl")
    core = comfy_host.core
    proj_in = next(a for a in sorted(key_map) if a.startswith("lora_unet_down_blocks_") and a.endswith("_proj_in"))
    weights = [key_map["lora_unet_add_embedding_linear_1"], key_map[proj_in]]
    layers = {core.prefix_for_weight(w, key_map): core.TriLoRALayer(torch.randn(shapes[w][0], 2),
              torch.tensor([2.0, 1.0]), torch.randn(2, *shapes[w][1:]), 2.0) for w in weights}
    core.write_trilora(str(comfy_host.loras / "sdxl_source.safetensors"), layers)
    name, info = run_node(comfy_host, "TriLoRAExportLoRA", trilora_name="sdxl_source.safetensors",
                          filename_prefix="trilora/sdxl_export", save_dtype="fp32", model=tiny.model)
    exported = core.read_adapter_file(str(comfy_host.loras / name)).layers
    assert "lora_unet_add_embedding_linear_1" in exported, sorted(exported)
    got = resumed_deltas(comfy_host, tiny.model, name)
    for w in weights:
        want = core.layers_by_weight(layers, key_map, shapes).layers[w].delta(torch.float64)
        torch.testing.assert_close(got[w], want, rtol=1e-5, atol=1e-6 * float(want.abs().max()),
                                   msg=lambda m, w=w: f"{w}: {m}")


def trained_parts(shapes, weights_with_bias, norm_weight):
    """A ComfyUI TrainLoraNode file: LoRA + .diff_b on matrices, .diff (+ .diff_b) on a 1-D weight."""
    g = torch.Generator().manual_seed(7)
    tensors, keys = {}, []
    for w in weights_with_bias:
        stem = w.removesuffix(".weight")
        tensors[f"{stem}.lora_up.weight"] = torch.randn(shapes[w][0], 2, generator=g) * 0.1
        tensors[f"{stem}.lora_down.weight"] = torch.randn(2, math.prod(shapes[w][1:]), generator=g) * 0.1
        tensors[f"{stem}.alpha"] = torch.tensor(1.0)
        keys.append(w)
        if f"{stem}.bias" in shapes:
            tensors[f"{stem}.diff_b"] = torch.randn(shapes[f"{stem}.bias"], generator=g) * 0.1
            keys.append(f"{stem}.bias")
    if norm_weight is not None:
        stem = norm_weight.removesuffix(".weight")
        tensors[f"{stem}.diff"] = torch.randn(shapes[norm_weight], generator=g) * 0.1
        keys.append(norm_weight)
    return tensors, keys


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_comfyui_trained_loras_apply_as_lora_loader_applies_them(comfy_host, family):
    """Issue 13, input 8: LoRA factors plus .diff / .diff_b, as ComfyUI's TrainLoraNode writes them."""
    tiny, key_map, shapes = family_setup(comfy_host, family)
    matrices = sorted(w for w in shapes if w.endswith(".weight") and len(shapes[w]) >= 2
                      and w.removesuffix(".weight") + ".bias" in shapes and key_map.get(w.removesuffix(".weight")) == w)
    norms = sorted(w for w in shapes if w.endswith(".weight") and len(shapes[w]) == 1)
    tensors, keys = trained_parts(shapes, matrices[:2], norms[0] if norms else None)
    name = f"comfy_trained_{family}.safetensors"
    save_file(tensors, str(comfy_host.loras / name))
    info = assert_as_lora_loader(comfy_host, tiny, name, keys)
    diffs = sum(k.endswith((".diff", ".diff_b")) for k in tensors)
    assert "2 of 2 layers matched (UNet 2)" in info and f"{diffs} full-weight diffs" in info, info


def test_wan_fun_loras_are_renamed_as_comfyui_renames_them(comfy_host):
    """Issue 13, input 9: Wan-Fun LoRAs (lora_unet__blocks_...) match after ComfyUI's rename."""
    tiny, key_map, shapes = family_setup(comfy_host, "wan2.1")
    g = torch.Generator().manual_seed(8)
    tensors, keys = {}, []
    for module in ("blocks_0_cross_attn_k", "blocks_0_self_attn_q"):
        w = key_map[f"lora_unet_{module}"]
        tensors[f"lora_unet__{module}.lora_up.weight"] = torch.randn(shapes[w][0], 2, generator=g) * 0.1
        tensors[f"lora_unet__{module}.lora_down.weight"] = torch.randn(2, shapes[w][1], generator=g) * 0.1
        keys.append(w)
    save_file(tensors, str(comfy_host.loras / "wan_fun.safetensors"))
    info = assert_as_lora_loader(comfy_host, tiny, "wan_fun.safetensors", keys)
    assert "2 of 2 layers matched (UNet 2)" in info, info
    assert sorted(resumed_deltas(comfy_host, tiny.model, "wan_fun.safetensors")) == sorted(keys)
