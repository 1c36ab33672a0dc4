"""Loading TriLoRA files in the real ComfyUI: TriLoRALoader, TriLoRALoaderModelOnly and the
stock LoraLoader patch exactly W + strength*(alpha/r) U diag(s) Vt, unpatch bit for bit, and
refuse bad files without touching the model."""
from __future__ import annotations

import comfy.model_management as mm
import pytest
import torch
from conftest import run_node
from safetensors.torch import save_file
from trilora_files import (
    LAYERS,
    assert_patched,
    patched_weights,
    random_layers,
    tolerance,
    weight,
    weights_restored,
    write_lora,
)


@pytest.fixture(autouse=True)
def unload_after(tiny):
    yield from weights_restored(tiny)


@pytest.fixture
def trilora_file(comfy_host, tiny):
    """(name, layers as read back) of a TriLoRA file over every LAYERS entry."""
    name = "loader_test.safetensors"
    comfy_host.core.write_trilora(str(comfy_host.loras / name), random_layers(comfy_host.core, tiny))
    return name, comfy_host.core.read_trilora(str(comfy_host.loras / name)).layers


@pytest.mark.parametrize("strength_model, strength_clip", [(1.0, 1.0), (0.6, -1.5)])
def test_loader_patches_the_exact_update(comfy_host, tiny, trilora_file, unload_after, strength_model, strength_clip):
    name, layers = trilora_file
    model, clip, info = run_node(comfy_host, "TriLoRALoader", model=tiny.model, clip=tiny.clip,
                                 trilora_name=name, strength_model=strength_model, strength_clip=strength_clip)
    assert_patched(patched_weights(model, clip), unload_after, layers, strength_model, strength_clip)
    assert "5 of 5 layers matched (UNet 4, CLIP 1); rank 4" in info


def test_stock_lora_loader_reads_trilora_files(comfy_host, tiny, trilora_file, unload_after):
    name, layers = trilora_file
    model, clip = comfy_host.nodes.LoraLoader().load_lora(tiny.model, tiny.clip, name, 0.7, 1.3)
    assert_patched(patched_weights(model, clip), unload_after, layers, 0.7, 1.3)


def test_model_only_loader_leaves_clip_layers_alone(comfy_host, tiny, trilora_file, unload_after):
    name, layers = trilora_file
    model, info = run_node(comfy_host, "TriLoRALoaderModelOnly", model=tiny.model, trilora_name=name,
                           strength_model=1.0)
    got = patched_weights(model, tiny.clip)
    clip_key = LAYERS["lora_te_text_model_encoder_layers_0_mlp_fc1"][1]
    assert torch.equal(got["lora_te_text_model_encoder_layers_0_mlp_fc1"], unload_after[clip_key])
    assert "4 of 5 layers matched (UNet 4)" in info


def test_unpatching_restores_weights_bit_for_bit(comfy_host, tiny, trilora_file, unload_after):
    name, _ = trilora_file
    model, clip, _ = run_node(comfy_host, "TriLoRALoader", model=tiny.model, clip=tiny.clip, trilora_name=name,
                              strength_model=3.0, strength_clip=3.0)
    patched = patched_weights(model, clip)
    assert not any(torch.equal(patched[p], unload_after[k]) for p, (_, k) in LAYERS.items())
    mm.unload_all_models()
    for part, key in LAYERS.values():
        assert torch.equal(weight(tiny, part, key), unload_after[key])


def test_strength_zero_returns_the_inputs_untouched(comfy_host, tiny, trilora_file):
    name, _ = trilora_file
    model, clip, info = run_node(comfy_host, "TriLoRALoader", model=tiny.model, clip=tiny.clip,
                                 trilora_name=name, strength_model=0.0, strength_clip=0.0)
    assert model is tiny.model and clip is tiny.clip
    model, clip, _ = run_node(comfy_host, "TriLoRALoader", model=tiny.model, clip=tiny.clip,
                              trilora_name=name, strength_model=0.0, strength_clip=1.0)
    assert model is tiny.model and clip is not tiny.clip


def test_partial_loading_gives_the_same_output_as_full_loading(comfy_host, tiny, trilora_file):
    name, _ = trilora_file
    model, _, _ = run_node(comfy_host, "TriLoRALoader", model=tiny.model, clip=tiny.clip, trilora_name=name,
                           strength_model=2.0, strength_clip=0.0)
    g = torch.Generator().manual_seed(3)
    x, t, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500.0]), torch.randn(1, 77, 768, generator=g)
    unet = model.model.diffusion_model

    mm.load_models_gpu([model])
    full = unet(x, t, ctx).detach()
    mm.unload_all_models()
    model.patch_model(device_to=torch.device("cpu"), lowvram_model_memory=1)  # nothing fits: per-forward patches
    try:
        assert model.model.model_lowvram and model.model.lowvram_patch_counter > 0
        partial = unet(x, t, ctx).detach()
    finally:
        model.unpatch_model(torch.device("cpu"))
    base = unet(x, t, ctx).detach()
    torch.testing.assert_close(partial, full, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(base, full, atol=1e-4), "the adapter changed nothing"


def test_truncation_at_load_equals_truncating_the_file(comfy_host, tiny, trilora_file, unload_after):
    name, layers = trilora_file
    core = comfy_host.core
    cut = {p: core.truncate(layer, rank=2) for p, layer in layers.items()}
    core.write_trilora(str(comfy_host.loras / "loader_cut.safetensors"), cut)
    cut = core.read_trilora(str(comfy_host.loras / "loader_cut.safetensors")).layers
    model, clip, info = run_node(comfy_host, "TriLoRALoader", model=tiny.model, clip=tiny.clip, trilora_name=name,
                                 strength_model=1.0, strength_clip=1.0, max_rank=2)
    assert "rank 2" in info
    assert_patched(patched_weights(model, clip), unload_after, cut, 1.0, 1.0)


def test_energy_truncation_keeps_the_share_asked(comfy_host, tiny, trilora_file):
    name, layers = trilora_file
    model, clip, info = run_node(comfy_host, "TriLoRALoader", model=tiny.model, clip=tiny.clip, trilora_name=name,
                                 strength_model=1.0, strength_clip=1.0, energy=0.5)
    kept = [patch[0][1].weights[1].shape[0] for patch in model.patches.values()]
    # the top 3 of 4 descending singular values always hold at least 3/4 of the energy
    assert len(kept) == 4 and all(k <= 3 for k in kept), kept


def test_a_lora_file_is_converted_exactly(comfy_host, tiny, unload_after):
    g = torch.Generator().manual_seed(5)
    lora = {}
    for prefix, (part, key) in LAYERS.items():
        shape = weight(tiny, part, key).shape
        up = torch.randn(shape[0], 3, *([1] * (len(shape) - 2)), generator=g) * 0.1
        lora[prefix] = (up, torch.randn(3, *shape[1:], generator=g) * 0.1, 1.5)
    write_lora(comfy_host.loras / "plain_lora.safetensors", lora)
    stock_m, stock_c = comfy_host.nodes.LoraLoader().load_lora(tiny.model, tiny.clip, "plain_lora.safetensors", 1, 1)
    want = patched_weights(stock_m, stock_c)
    mm.unload_all_models()
    ours_m, ours_c, info = run_node(comfy_host, "TriLoRALoader", model=tiny.model, clip=tiny.clip,
                                    trilora_name="plain_lora.safetensors", strength_model=1.0, strength_clip=1.0)
    got = patched_weights(ours_m, ours_c)
    for prefix in LAYERS:
        torch.testing.assert_close(got[prefix], want[prefix], **tolerance(want[prefix].dtype))
    assert "rank 3" in info


def test_sampling_with_the_loaded_model_runs(comfy_host, tiny, trilora_file):
    nodes = comfy_host.nodes
    model, clip, _ = run_node(comfy_host, "TriLoRALoader", model=tiny.model, clip=tiny.clip,
                              trilora_name=trilora_file[0], strength_model=1.0, strength_clip=1.0)
    pos = nodes.CLIPTextEncode().encode(clip, "a cube")[0]
    latent = nodes.EmptyLatentImage().generate(64, 64, 1)[0]
    out = nodes.KSampler().sample(model, 1, 2, 1.0, "euler", "normal", pos, pos, latent)[0]
    assert torch.isfinite(out["samples"]).all()


def test_the_parsed_file_is_cached_until_the_file_changes(comfy_host, tiny):
    core, loras = comfy_host.core, comfy_host.loras
    cache = __import__(comfy_host.pack.__name__ + ".nodes.file_cache", fromlist=["load_cached"])
    path = str(loras / "cached.safetensors")
    core.write_trilora(path, random_layers(core, tiny, seed=1))
    first = cache.load_cached(path)
    assert cache.load_cached(path) is first
    core.write_trilora(path, random_layers(core, tiny, seed=2, rank=2))
    again = cache.load_cached(path)
    assert again is not first and next(iter(again.layers.values())).rank == 2


# --- bad files: a clear error that names the file, and the model untouched ---------------------

def bad_file_cases(core, tiny):
    layers = random_layers(core, tiny)
    prefix = next(iter(layers))
    return {
        "not_safetensors": (b"this is not a safetensors file", "safetensors"),
        "missing_s": ({f"{prefix}.trilora_u": layers[prefix].u, f"{prefix}.trilora_vt": layers[prefix].vt},
                      f"{prefix}.trilora_s"),
        "other_model": ({"lora_unet_not_a_layer.trilora_u": torch.ones(8, 2),
                         "lora_unet_not_a_layer.trilora_s": torch.ones(2),
                         "lora_unet_not_a_layer.trilora_vt": torch.ones(2, 8)}, "no layer of the file matches"),
        "wrong_shape": ({f"{prefix}.trilora_u": torch.ones(320, 2), f"{prefix}.trilora_s": torch.ones(2),
                         f"{prefix}.trilora_vt": torch.ones(2, 100)}, "does not fit the model"),
        "loha": ({f"{prefix}.hada_w1_a": torch.ones(320, 2), f"{prefix}.hada_w1_b": torch.ones(2, 320)},
                 "LoraLoader"),
    }


@pytest.mark.parametrize("case", ["not_safetensors", "missing_s", "other_model", "wrong_shape", "loha"])
def test_bad_files_give_a_clear_error_and_leave_the_model_untouched(comfy_host, tiny, case):
    core = comfy_host.core
    content, expected = bad_file_cases(core, tiny)[case]
    name = f"bad_{case}.safetensors"
    path = comfy_host.loras / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        save_file({k: v.contiguous() for k, v in content.items()}, str(path))
    patches_before = dict(tiny.model.patches)
    with pytest.raises(core.TriLoRAFileError) as err:
        run_node(comfy_host, "TriLoRALoader", model=tiny.model, clip=tiny.clip, trilora_name=name,
                 strength_model=1.0, strength_clip=1.0)
    assert name in str(err.value) and expected in str(err.value), str(err.value)
    assert tiny.model.patches == patches_before and not tiny.model.patches
