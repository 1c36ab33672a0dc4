"""T-LoRA's noise-level rank end to end in the real ComfyUI: Train TriLoRA's timestep_min_rank masks
s per sample by noise level (also through gradient checkpointing's recompute), the file records the
schedule with its bands kept apart, and Load TriLoRA / Apply TriLoRA apply the same mask at each
sampling step; the stock LoraLoader still loads the file (every direction at every step).

The sampling reference is independent of the hooks: one KSamplerAdvanced step at a time, each on a
model carrying ComfyUI's own weight patch of the exact masked delta, the first r(t) directions with
t = timestep(sigma) / 999 (the trainer's sigma = percent_to_sigma(1 - t) turned around)."""
from __future__ import annotations

import comfy.model_management as mm
import comfy.samplers
import pytest
import torch
from conftest import run_node
from test_train import load_data, train
from trilora_files import LAYERS, assert_patched, patched_weights, random_layers, weights_restored

from harness.host import pack_module

RANK = 4
STEPS = 4


@pytest.fixture(scope="module")
def data(comfy_host):
    return load_data(comfy_host)


def first_levels(comfy_host, seed: int, n: int) -> list[float]:
    """The noise levels (1 the noisiest) of step 1's batch of n, as the trainer draws them."""
    core = comfy_host.core
    return [float(t) for t in core.timesteps.sample_noise_levels("uniform", n, core.generator(seed, "noise", 0, 0))]


def used(layer) -> int:
    """Directions of a saved layer above rounding."""
    return int((layer.s.abs() > 1e-5 * layer.s.abs().max().clamp_min(1e-30)).sum())


def unet_directions(trilora) -> set[int]:
    return {used(layer) for prefix, layer in trilora.layers.items() if prefix.startswith("lora_unet")}


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize(("seed", "batch"), [(3, 1), (4, 1), (3, 2)])
def test_training_trains_only_the_directions_of_the_steps_noise_levels(comfy_host, data, checkpointing, seed,
                                                                       batch):
    # Step 1 starts at s = 0, where only s has a gradient, and a direction no sample of the step
    # used gets none: after one step exactly the directions the mask let through are non-zero.
    core = comfy_host.core
    levels = first_levels(comfy_host, seed, batch)
    want = max(core.active_directions(t, RANK, 1) for t in levels)
    assert 1 <= want < RANK  # the seeds pick levels where the mask shows
    _, trilora, _, _ = train(comfy_host, data, steps=1, rank=RANK, seed=seed, batch_size=batch,
                             timestep_min_rank=1, gradient_checkpointing=checkpointing)
    assert unet_directions(trilora) == {want}
    assert core.read_schedule(trilora.metadata) == (1, 1.0)
    _, plain, _, _ = train(comfy_host, data, steps=1, rank=RANK, seed=seed, batch_size=batch,
                           gradient_checkpointing=checkpointing)
    assert unet_directions(plain) == {RANK}
    assert core.TIMESTEP_RANK_KEY not in plain.metadata


def test_the_saved_file_records_the_schedule_and_keeps_the_bands(comfy_host, data, tmp_path):
    core = comfy_host.core
    _, trilora, _, _ = train(comfy_host, data, steps=3, rank=RANK, seed=0, timestep_min_rank=1)
    path = str(tmp_path / "masked.safetensors")
    core.write_trilora(path, trilora.layers, trilora.metadata)
    read = core.read_trilora(path)
    assert read.metadata[core.TIMESTEP_RANK_KEY] == '{"min_rank": 1, "power": 1.0}'
    for prefix, layer in read.layers.items():  # already banded: writing keeps the factors
        torch.testing.assert_close(layer.u, trilora.layers[prefix].u, rtol=1e-5, atol=1e-6)


def test_bad_values_are_named(comfy_host, data, tmp_path):
    with pytest.raises(ValueError, match="timestep_min_rank must not be negative"):
        train(comfy_host, data, steps=1, timestep_min_rank=-1)
    core, name = comfy_host.core, "bad_schedule.safetensors"
    layer = core.TriLoRALayer(torch.randn(8, 2), torch.ones(2), torch.randn(2, 8), 2.0)
    with pytest.raises(core.TriLoRAFileError, match="trilora_timestep_rank must be JSON"):
        core.write_trilora(str(tmp_path / name), {"x": layer}, {core.TIMESTEP_RANK_KEY: "one"})


# ---- sampling


@pytest.fixture
def restored(tiny):
    yield from weights_restored(tiny)


def write_masked(comfy_host, tiny, name: str, min_rank: int):
    core = comfy_host.core
    core.write_trilora(str(comfy_host.loras / name), random_layers(core, tiny, rank=RANK, seed=5, alpha=8.0),
                       core.schedule_metadata(min_rank))
    return core.read_trilora(str(comfy_host.loras / name)).layers


def prefix(core, layer, k: int):
    """The first k directions, as a layer with the same alpha / r."""
    return core.TriLoRALayer(layer.u[:, :k], layer.s[:k], layer.vt[:k], layer.alpha * k / layer.rank)


def ksample(comfy_host, model, pos, latent, **kw):
    return comfy_host.nodes.KSampler().sample(model, 7, STEPS, 1.0, "euler", "normal", pos, pos, latent, **kw)[0]


def reference(comfy_host, tiny, layers, min_rank, pos, latent):
    """Sampling one step at a time, each on the model patched with that step's masked delta."""
    core, nodes = comfy_host.core, comfy_host.nodes
    patching = pack_module(comfy_host, "nodes.patching")
    ms = tiny.model.model.model_sampling
    sigmas = comfy.samplers.calculate_sigmas(ms, "normal", STEPS)
    counts = [core.active_directions(float(ms.timestep(sigmas[i])) / 999, RANK, min_rank) for i in range(STEPS)]
    for i, k in enumerate(counts):
        model, _, _ = patching.apply_trilora(tiny.model, None, {p: prefix(core, x, k) for p, x in layers.items()},
                                             1.0, 0.0, "reference")
        latent = nodes.KSamplerAdvanced().sample(model, "enable" if i == 0 else "disable", 7, STEPS, 1.0, "euler",
                                                 "normal", pos, pos, latent, i, i + 1,
                                                 "enable" if i < STEPS - 1 else "disable")[0]
    return latent, counts


def test_sampling_masks_by_the_steps_noise_level(comfy_host, tiny, restored):
    nodes = comfy_host.nodes
    layers = write_masked(comfy_host, tiny, "noise_rank.safetensors", 1)
    model, _, info = run_node(comfy_host, "TriLoRALoader", model=tiny.model, clip=tiny.clip,
                              trilora_name="noise_rank.safetensors", strength_model=1.0, strength_clip=1.0)
    assert "noise-level rank (T-LoRA, min_rank 1): 4 UNet layers use, at each sampling step" in info
    pos = nodes.CLIPTextEncode().encode(tiny.clip, "a cube")[0]
    latent = nodes.EmptyLatentImage().generate(64, 64, 1)[0]
    got = ksample(comfy_host, model, pos, latent)["samples"]
    want, counts = reference(comfy_host, tiny, layers, 1, pos, latent)
    assert len(set(counts)) > 2  # the steps see different ranks
    torch.testing.assert_close(got, want["samples"], rtol=1e-4, atol=1e-4)
    full, _, _ = pack_module(comfy_host, "nodes.patching").apply_trilora(tiny.model, None, layers, 1.0, 0.0, "full")
    assert (ksample(comfy_host, full, pos, latent)["samples"] - got).abs().max() > 100 * 1e-4


def test_a_mask_of_all_ones_samples_as_full_rank_and_apply_trilora_masks_too(comfy_host, tiny, restored):
    nodes, core = comfy_host.nodes, comfy_host.core
    layers = write_masked(comfy_host, tiny, "noise_rank_full.safetensors", RANK)
    model = run_node(comfy_host, "TriLoRALoaderModelOnly", model=tiny.model,
                     trilora_name="noise_rank_full.safetensors", strength_model=1.0)[0]
    pos = nodes.CLIPTextEncode().encode(tiny.clip, "a cube")[0]
    latent = nodes.EmptyLatentImage().generate(64, 64, 1)[0]
    full, _, _ = pack_module(comfy_host, "nodes.patching").apply_trilora(tiny.model, None, layers, 1.0, 0.0, "full")
    torch.testing.assert_close(ksample(comfy_host, model, pos, latent)["samples"],
                               ksample(comfy_host, full, pos, latent)["samples"], rtol=1e-4, atol=1e-4)
    trilora = core.TriLoRAFile(layers, core.schedule_metadata(1))
    applied = run_node(comfy_host, "ApplyTriLoRA", model=tiny.model, trilora=trilora, strength=1.0)[0]
    assert any(k.startswith("trilora_noise_rank") for k in applied.injections)


def test_the_stock_lora_loader_applies_every_direction(comfy_host, tiny, restored):
    layers = write_masked(comfy_host, tiny, "noise_rank_stock.safetensors", 1)
    model, clip = comfy_host.nodes.LoraLoader().load_lora(tiny.model, tiny.clip, "noise_rank_stock.safetensors",
                                                          1.0, 1.0)
    assert_patched(patched_weights(model, clip), restored, layers, 1.0)
    assert set(layers) == set(LAYERS)


def test_truncation_at_load_turns_the_mask_off_and_says_so(comfy_host, tiny, restored):
    write_masked(comfy_host, tiny, "noise_rank_cut.safetensors", 1)
    model, _, info = run_node(comfy_host, "TriLoRALoader", model=tiny.model, clip=tiny.clip,
                              trilora_name="noise_rank_cut.safetensors", strength_model=1.0, strength_clip=1.0,
                              max_rank=2)
    assert "not applied (max_rank / energy re-sort the directions by strength)" in info
    assert not model.injections


def test_partial_loading_runs_the_hooks_as_full_loading_and_unloading_removes_them(comfy_host, tiny, restored):
    write_masked(comfy_host, tiny, "noise_rank_lowvram.safetensors", 1)
    model = run_node(comfy_host, "TriLoRALoaderModelOnly", model=tiny.model,
                     trilora_name="noise_rank_lowvram.safetensors", strength_model=1.0)[0]
    g = torch.Generator().manual_seed(3)
    x, t, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500.0]), torch.randn(1, 77, 768, generator=g)
    unet = model.model.diffusion_model
    mm.load_models_gpu([model])
    full = unet(x, t, ctx).detach()  # outside a sampler: every direction
    mm.unload_all_models()
    assert not any(m._forward_hooks for m in unet.modules())
    model.patch_model(device_to=torch.device("cpu"), lowvram_model_memory=1)  # nothing fits: per-forward casts
    try:
        assert model.model.model_lowvram
        partial = unet(x, t, ctx).detach()
    finally:
        model.unpatch_model(torch.device("cpu"))
    base = unet(x, t, ctx).detach()
    torch.testing.assert_close(partial, full, rtol=1e-4, atol=1e-5)
    assert (full - base).abs().max() > 1e-3


def test_export_as_lora_drops_the_schedule_and_the_stock_loader_applies_every_direction(comfy_host, tiny, restored):
    core = comfy_host.core
    layers = write_masked(comfy_host, tiny, "noise_rank_export.safetensors", 1)
    name, _ = run_node(comfy_host, "TriLoRAExportLoRA", trilora_name="noise_rank_export.safetensors",
                       filename_prefix="noise_rank/exported", save_dtype="fp32")
    read = core.read_adapter_file(str(comfy_host.loras / name))
    assert core.TIMESTEP_RANK_KEY not in read.metadata  # the bands do not survive a re-formed file
    model, clip = comfy_host.nodes.LoraLoader().load_lora(tiny.model, tiny.clip, name, 1.0, 1.0)
    assert_patched(patched_weights(model, clip), restored, layers, 1.0)
