"""The TriLoRA tools in the real ComfyUI on the tiny model: convert a LoRA exactly, export a TriLoRA
as a kohya LoRA that the stock LoraLoader applies identically, extract from two models, resize,
merge, the spectrum view, and the block-weights loader. Files go to the session's temporary loras
folder; bad inputs fail with the exact message and write nothing."""
from __future__ import annotations

import json

import comfy.model_management as mm
import comfy.utils
import numpy as np
import pytest
import torch
from conftest import run_node
from safetensors import safe_open
from safetensors.torch import save_file
from trilora_files import LAYERS, random_layers, weight, write_lora

NONE = "[None]"
# The pack's names (ComfyUI's UNet weight keys, kohya style) for the LAYERS weights.
PACK_NAMES = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q",
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k":
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k",
    "lora_unet_down_blocks_0_resnets_0_conv1": "lora_unet_input_blocks_1_0_in_layers_2",
    "lora_unet_down_blocks_0_attentions_0_proj_in": "lora_unet_input_blocks_1_1_proj_in",
    "lora_te_text_model_encoder_layers_0_mlp_fc1": "lora_te_text_model_encoder_layers_0_mlp_fc1",
}
TOOL_IDS = {
    "TriLoRAConvertLoRA": "Convert LoRA to TriLoRA",
    "TriLoRAExportLoRA": "Export TriLoRA as LoRA",
    "TriLoRAExtract": "Extract TriLoRA from Checkpoints",
    "TriLoRAResize": "Resize TriLoRA (Rank / Energy)",
    "TriLoRAMerge": "Merge TriLoRAs",
    "TriLoRASpectrum": "TriLoRA Spectrum",
    "TriLoRALoaderBlockWeights": "Load TriLoRA (Block Weights)",
}


@pytest.fixture(autouse=True)
def unload_after(tiny):
    originals = {key: weight(tiny, part, key).clone() for part, key in LAYERS.values()}
    yield originals
    mm.unload_all_models()
    for part, key in LAYERS.values():
        assert torch.equal(weight(tiny, part, key), originals[key]), f"{key} not restored"


def delta64(layer) -> torch.Tensor:
    flat = (layer.alpha / layer.rank) * (layer.u.double() * layer.s.double()) @ layer.vt.double().flatten(1)
    return flat.reshape(layer.weight_shape)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def lora_updown(tiny, rank=3, seed=5, alpha=1.5):
    """{prefix: (up, down, alpha)} for every LAYERS weight; LoCon layout for the convs."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for prefix, (part, key) in LAYERS.items():
        shape = weight(tiny, part, key).shape
        up = torch.randn(shape[0], rank, *([1] * (len(shape) - 2)), generator=g) * 0.1
        out[prefix] = (up, torch.randn(rank, *shape[1:], generator=g) * 0.1, alpha)
    return out


def lora_delta(up, down, alpha) -> torch.Tensor:
    return (alpha / up.shape[1] * up.double().flatten(1) @ down.double().flatten(1)).reshape(up.shape[0],
                                                                                           *down.shape[1:])


def patched(model, clip) -> dict[str, torch.Tensor]:
    """{LAYERS prefix: weight} as ComfyUI computes them when it loads the patchers for sampling."""
    mm.load_models_gpu([p for p in (model, clip and clip.patcher) if p is not None])
    out = {}
    for prefix, (part, key) in LAYERS.items():
        holder = model.model if part == "unet" else clip.cond_stage_model
        out[prefix] = comfy.utils.get_attr(holder, key).detach().clone()
    mm.unload_all_models()
    return out


def tolerance(dtype) -> dict:
    """fp32 weights: float rounding; fp16 (the CPU text encoder): one unit in the last place."""
    return dict(rtol=1e-3, atol=1e-5) if dtype == torch.float16 else dict(rtol=1e-5, atol=1e-6)


def assert_same_weights(got: dict, want: dict) -> None:
    for prefix in LAYERS:
        torch.testing.assert_close(got[prefix], want[prefix], **tolerance(want[prefix].dtype),
                                   msg=lambda m, p=prefix: f"{p}: {m}")


def stock_lora(comfy_host, tiny, name, strength_model=1.0, strength_clip=1.0):
    return comfy_host.nodes.LoraLoader().load_lora(tiny.model, tiny.clip, name, strength_model, strength_clip)


def file_keys(path) -> tuple[list[str], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return sorted(f.keys()), dict(f.metadata() or {})


def write_trilora_file(comfy_host, tiny, name, **kwargs):
    core = comfy_host.core
    core.write_trilora(str(comfy_host.loras / name), random_layers(core, tiny, **kwargs),
                       metadata={"ss_base_model_version": "sd_v1"})
    return core.read_trilora(str(comfy_host.loras / name)).layers


# --------------------------------------------------------------------------- registration


def test_every_tool_is_registered_with_tooltips_and_a_trilora_name(comfy_host):
    mappings = comfy_host.nodes.NODE_CLASS_MAPPINGS
    for node_id, display in TOOL_IDS.items():
        cls = mappings[node_id]
        assert comfy_host.nodes.NODE_DISPLAY_NAME_MAPPINGS[node_id] == display and "TriLoRA" in display
        assert cls.CATEGORY == ("loaders" if node_id == "TriLoRALoaderBlockWeights" else "utils/trilora")
        spec = cls.INPUT_TYPES()
        for name, (_, options) in {**spec["required"], **spec.get("optional", {})}.items():
            assert options.get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES) and all(cls.OUTPUT_TOOLTIPS), node_id
    assert list(mappings["TriLoRAExtract"].RETURN_TYPES) == ["TRILORA", "STRING", "STRING"]
    assert list(mappings["TriLoRASpectrum"].RETURN_TYPES) == ["IMAGE", "STRING"]
    assert list(mappings["TriLoRAExportLoRA"].RETURN_TYPES) == ["STRING", "STRING"]
    assert list(mappings["TriLoRALoaderBlockWeights"].INPUT_TYPES()["required"]) == [
        "model", "clip", "trilora_name", "strength_model", "strength_clip",
        "input_blocks", "middle_block", "output_blocks", "text_encoder"]


# --------------------------------------------------------------------------- convert and export


def test_convert_is_exact_and_renames_to_the_pack_names_with_a_model(comfy_host, tiny):
    lora = lora_updown(tiny)
    write_lora(comfy_host.loras / "conv_src.safetensors", lora)
    trilora, name, info = run_node(comfy_host, "TriLoRAConvertLoRA", lora_name="conv_src.safetensors",
                                   filename_prefix="conv/plain", save_dtype="fp32")
    assert name == "conv/plain_00001_.safetensors" and (comfy_host.loras / name).is_file()
    assert info == f"converted conv_src.safetensors exactly: 5 layers, rank 3; saved as {name}"
    on_disk = comfy_host.core.read_trilora(str(comfy_host.loras / name))
    assert sorted(on_disk.layers) == sorted(LAYERS) == sorted(trilora.layers)
    for prefix, (up, down, alpha) in lora.items():
        layer = on_disk.layers[prefix]
        assert comfy_host.core.is_canonical(layer) and layer.u.dtype == torch.float32
        assert rel(delta64(layer), lora_delta(up, down, alpha)) < 1e-5
    assert on_disk.metadata["ss_network_module"] == "trilora"
    assert json.loads(on_disk.metadata["trilora_tool_args"])["tool"] == "convert"

    renamed, name2, _ = run_node(comfy_host, "TriLoRAConvertLoRA", lora_name="conv_src.safetensors",
                                 filename_prefix="conv/plain", save_dtype="fp32", model=tiny.model, clip=tiny.clip)
    assert name2 == "conv/plain_00002_.safetensors"
    assert sorted(renamed.layers) == sorted(PACK_NAMES.values())
    for prefix, new in PACK_NAMES.items():
        assert rel(delta64(renamed.layers[new]), lora_delta(*lora[prefix])) < 1e-5


def test_lora_to_trilora_to_lora_round_trip_through_the_stock_loader(comfy_host, tiny):
    lora = lora_updown(tiny, rank=3, seed=11, alpha=2.0)
    write_lora(comfy_host.loras / "rt_source.safetensors", lora)
    _, converted, _ = run_node(comfy_host, "TriLoRAConvertLoRA", lora_name="rt_source.safetensors",
                               filename_prefix="rt/converted", save_dtype="fp32", model=tiny.model, clip=tiny.clip)
    exported, info = run_node(comfy_host, "TriLoRAExportLoRA", trilora_name=converted, filename_prefix="rt/lora",
                              save_dtype="fp32", model=tiny.model, clip=tiny.clip)
    assert exported == "rt/lora_00001_.safetensors"
    assert info.startswith(f"exported {converted} as a kohya LoRA: 5 layers, rank 3 (kohya names from the "
                           "connected model)")
    keys, meta = file_keys(comfy_host.loras / exported)
    source_keys, _ = file_keys(comfy_host.loras / "rt_source.safetensors")
    assert keys == source_keys  # kohya's own names and suffixes, as the source had them
    assert meta["ss_network_module"] == "networks.lora"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("3", "2")
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "3", "conv_alpha": "2"}
    assert meta["ss_output_name"] == "lora" and meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["sshs_model_hash"] == comfy_host.core.file_content_hash(str(comfy_host.loras / exported))
    assert "trilora_format" not in meta

    want = patched(*stock_lora(comfy_host, tiny, "rt_source.safetensors", 0.8, 1.2))
    got = patched(*stock_lora(comfy_host, tiny, exported, 0.8, 1.2))
    assert_same_weights(got, want)
    assert not torch.equal(got[next(iter(LAYERS))], weight(tiny, *LAYERS[next(iter(LAYERS))]))


def test_export_without_a_model_keeps_names_and_takes_an_in_memory_trilora(comfy_host, tiny):
    layers = write_trilora_file(comfy_host, tiny, "exp_src.safetensors", rank=4, alpha=3.0)
    adapter = comfy_host.core.TriLoRAFile(layers, {"modelspec.architecture": "stable-diffusion-v1/trilora"})
    name, info = run_node(comfy_host, "TriLoRAExportLoRA", trilora_name=NONE, filename_prefix="exp/mem",
                          save_dtype="fp16", trilora=adapter)
    assert info == (f"exported trilora (in memory) as a kohya LoRA: 5 layers, rank 4 (names as in the source); "
                    f"saved as {name}")
    keys, meta = file_keys(comfy_host.loras / name)
    assert keys == sorted(f"{p}.{s}" for p in LAYERS for s in ("alpha", "lora_down.weight", "lora_up.weight"))
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    read = comfy_host.core.read_adapter_file(str(comfy_host.loras / name))
    with safe_open(str(comfy_host.loras / name), framework="pt") as f:
        assert f.get_tensor(f"{next(iter(LAYERS))}.lora_up.weight").dtype == torch.float16
    for prefix, layer in layers.items():
        assert rel(delta64(read.layers[prefix]), delta64(layer)) < 3e-3  # fp16 factors


def test_export_refuses_factors_that_overflow_half_precision(comfy_host, tiny):
    core = comfy_host.core
    prefix = next(iter(LAYERS))
    huge = core.TriLoRAFile({prefix: core.TriLoRALayer(torch.eye(320)[:, :1], torch.tensor([1e10]),
                                                       torch.eye(320)[:1], 1.0)})
    with pytest.raises(ValueError) as err:
        run_node(comfy_host, "TriLoRAExportLoRA", trilora_name=NONE, filename_prefix="exp/huge", save_dtype="fp16",
                 trilora=huge)
    assert str(err.value) == f"TriLoRAExportLoRA: {prefix}.lora_up.weight does not fit in float16; save it as fp32"
    assert not list(comfy_host.loras.rglob("huge*"))


def test_a_peft_named_lora_converts_to_layers_the_loader_applies(comfy_host, tiny, unload_after):
    g = torch.Generator().manual_seed(2)
    q_key = LAYERS["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"][1]
    fc1_key = LAYERS["lora_te_text_model_encoder_layers_0_mlp_fc1"][1]
    a_q, b_q = torch.randn(2, 320, generator=g) * 0.1, torch.randn(320, 2, generator=g) * 0.1
    a_fc, b_fc = torch.randn(2, 768, generator=g) * 0.1, torch.randn(3072, 2, generator=g) * 0.1
    save_file({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": a_q,
               "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": b_q,
               "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_A.weight": a_fc,
               "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_B.weight": b_fc},
              str(comfy_host.loras / "peft.safetensors"))
    trilora, name, info = run_node(comfy_host, "TriLoRAConvertLoRA", lora_name="peft.safetensors",
                                   filename_prefix="peft/converted", save_dtype="fp32", model=tiny.model,
                                   clip=tiny.clip)
    assert sorted(trilora.layers) == ["lora_te_text_model_encoder_layers_0_mlp_fc1",
                                      "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"]
    assert "kept their names" not in info
    model, clip, _ = run_node(comfy_host, "TriLoRALoader", model=tiny.model, clip=tiny.clip, trilora_name=name,
                              strength_model=1.0, strength_clip=1.0)
    got = patched(model, clip)
    q_prefix, fc_prefix = (p for p, (_, k) in LAYERS.items() if k in (q_key, fc1_key))
    torch.testing.assert_close(got[q_prefix], (unload_after[q_key].double() + b_q.double() @ a_q.double()).float(),
                               rtol=1e-5, atol=1e-6)
    want_fc = (unload_after[fc1_key].double() + b_fc.double() @ a_fc.double()).half()
    torch.testing.assert_close(got[fc_prefix], want_fc, **tolerance(torch.float16))


# --------------------------------------------------------------------------- extract


@pytest.fixture
def tuned(comfy_host, tiny):
    """The tiny model and text encoder with a rank-3 LoRA applied by the stock loader."""
    lora = lora_updown(tiny, rank=3, seed=21, alpha=3.0)
    write_lora(comfy_host.loras / "extract_src.safetensors", lora)
    model, clip = stock_lora(comfy_host, tiny, "extract_src.safetensors")
    return model, clip, lora


def test_extract_recovers_a_lora_exactly_from_the_model_difference(comfy_host, tiny, tuned):
    model, clip, lora = tuned
    trilora, name, info = run_node(comfy_host, "TriLoRAExtract", model_finetuned=model, model_base=tiny.model,
                                   filename_prefix="extract/full", rank=8, energy=1.0, svd_method="exact",
                                   save_dtype="fp32", clip_finetuned=clip, clip_base=tiny.clip)
    assert name == "extract/full_00001_.safetensors"
    assert sorted(trilora.layers) == sorted(PACK_NAMES.values())
    assert info.startswith("extracted 5 changed layers (UNet 4, CLIP 1), rank 3; they keep 100.0% of the "
                           "difference on average")
    assert "139 weights unchanged" in info  # 69 UNet + 75 text-encoder matrices, 5 changed
    for prefix, new in PACK_NAMES.items():
        layer = trilora.layers[new]
        assert layer.rank == 3 and comfy_host.core.is_canonical(layer)
        tol = 2e-3 if new.startswith("lora_te") else 1e-5  # the text encoder's weights are fp16
        assert rel(delta64(layer), lora_delta(*lora[prefix])) < tol, new
    meta = trilora.metadata
    assert meta["ss_base_model_version"] == "sd_v1"
    assert json.loads(meta["trilora_tool_args"]) == {"tool": "extract", "rank": 8, "energy": 1.0,
                                                     "svd_method": "exact", "text_encoder": True}

    want = patched(model, clip)
    got = patched(*run_node(comfy_host, "TriLoRALoader", model=tiny.model, clip=tiny.clip, trilora_name=name,
                            strength_model=1.0, strength_clip=1.0)[:2])
    for prefix in LAYERS:
        torch.testing.assert_close(got[prefix], want[prefix], **(tolerance(torch.float16)
                                   if prefix.startswith("lora_te") else dict(rtol=1e-5, atol=1e-5)))


def test_extract_at_a_lower_rank_is_the_optimal_cut_and_randomized_agrees(comfy_host, tiny, tuned):
    model, _, lora = tuned
    core = comfy_host.core
    runs = {}
    for method in ("exact", "randomized"):
        trilora, _, info = run_node(comfy_host, "TriLoRAExtract", model_finetuned=model, model_base=tiny.model,
                                    filename_prefix=f"extract/{method}", rank=2, energy=1.0, svd_method=method,
                                    save_dtype="fp32")
        assert "(UNet 4), rank 2" in info
        runs[method] = trilora.layers
    for prefix, new in PACK_NAMES.items():
        if new.startswith("lora_te"):
            assert new not in runs["exact"]  # no clip inputs: UNet only
            continue
        best = core.truncate(core.lora_to_trilora(*lora[prefix]), rank=2)
        assert rel(delta64(runs["exact"][new]), delta64(best)) < 1e-5
        assert rel(delta64(runs["randomized"][new]), delta64(best)) < 1e-4


def test_extract_by_energy_keeps_the_fewest_directions_reaching_it(comfy_host, tiny, tuned):
    model, _, lora = tuned
    core = comfy_host.core
    trilora, _, _ = run_node(comfy_host, "TriLoRAExtract", model_finetuned=model, model_base=tiny.model,
                             filename_prefix="extract/energy", rank=32, energy=0.6, svd_method="exact",
                             save_dtype="fp16")
    for prefix, new in PACK_NAMES.items():
        if new.startswith("lora_te"):
            continue
        s2 = core.spectrum(core.lora_to_trilora(*lora[prefix])).double() ** 2
        share = torch.cumsum(s2, 0) / s2.sum()
        want = int((share >= 0.6).nonzero()[0, 0]) + 1
        assert trilora.layers[new].rank == want and trilora.layers[new].u.dtype == torch.float16


def test_extract_refuses_identical_models_and_a_lone_clip(comfy_host, tiny):
    extract = comfy_host.nodes.NODE_CLASS_MAPPINGS["TriLoRAExtract"]
    args = dict(model_finetuned=tiny.model, model_base=tiny.model, filename_prefix="extract/none", rank=4,
                energy=1.0, svd_method="exact", save_dtype="fp16")
    with pytest.raises(ValueError) as err:
        extract.execute(**args, clip_finetuned=tiny.clip, clip_base=tiny.clip)
    assert str(err.value) == ("TriLoRAExtract: the models and the text encoders have the same weights: "
                              "nothing to extract")
    with pytest.raises(ValueError) as err:
        extract.execute(**args, clip_finetuned=tiny.clip)
    assert str(err.value) == "TriLoRAExtract: connect both clip_finetuned and clip_base, or neither"
    assert not (comfy_host.loras / "extract").exists() or not list((comfy_host.loras / "extract").glob("none*"))


# --------------------------------------------------------------------------- resize and merge


def test_resize_cuts_optimally_and_keeps_the_metadata(comfy_host, tiny):
    core = comfy_host.core
    layers = write_trilora_file(comfy_host, tiny, "resize_src.safetensors", rank=4, seed=7)
    trilora, name, info = run_node(comfy_host, "TriLoRAResize", trilora_name="resize_src.safetensors",
                                   filename_prefix="resize/r2", max_rank=2, energy=1.0, save_dtype="fp32")
    assert info.startswith("resized resize_src.safetensors: 5 layers, rank 4 -> rank 2; energy kept ")
    on_disk = core.read_trilora(str(comfy_host.loras / name))
    for prefix, layer in layers.items():
        assert on_disk.layers[prefix].rank == 2
        assert rel(delta64(on_disk.layers[prefix]), delta64(core.truncate(layer, rank=2))) < 1e-5
        # Eckart-Young: the error is exactly the dropped singular values
        s = core.spectrum(layer).double()
        err = (delta64(on_disk.layers[prefix]) - delta64(layer)).norm()
        assert abs(float(err) - float(s[2:].norm())) < 1e-4 * float(s.norm())
    assert on_disk.metadata["ss_base_model_version"] == "sd_v1"
    assert json.loads(on_disk.metadata["trilora_tool_args"])["max_rank"] == 2

    by_energy, _, _ = run_node(comfy_host, "TriLoRAResize", trilora_name=NONE, filename_prefix="resize/e",
                               max_rank=0, energy=0.5, save_dtype="fp32", trilora=trilora)
    assert all(layer.rank == 1 for layer in by_energy.layers.values())  # s1 >= s2 holds >= half


def test_resize_averages_the_energy_kept_over_layers_that_hold_any(comfy_host, tiny):
    """An all-zero layer (s = 0, as a fresh adapter starts) keeps 0 of 0: it is counted apart,
    not as 100% kept, so the average says what the cut did to the layers it cut."""
    core = comfy_host.core
    layers = random_layers(core, tiny, rank=4, seed=11)
    zero = sorted(layers)[:2]
    for prefix in zero:
        layers[prefix] = core.TriLoRALayer(layers[prefix].u, torch.zeros(4), layers[prefix].vt, 2.0)
    core.write_trilora(comfy_host.loras / "resize_zero.safetensors", layers, {})
    _, _, info = run_node(comfy_host, "TriLoRAResize", trilora_name="resize_zero.safetensors",
                          filename_prefix="resize/zero", max_rank=1, energy=1.0, save_dtype="fp32")
    shares = {}
    for prefix in sorted(set(layers) - set(zero)):
        s = core.spectrum(layers[prefix]).double()
        shares[prefix] = float(s[0] ** 2 / (s ** 2).sum())
    worst = min(shares, key=shares.get)
    assert max(shares.values()) < 0.99  # the cut drops energy in every non-zero layer
    assert (f"energy kept {sum(shares.values()) / 3:.1%} on average (least: {shares[worst]:.1%} in {worst}), "
            "over the 3 layers that hold any; 2 all-zero layers; ") in info

    for prefix in set(layers) - set(zero):
        layers[prefix] = core.TriLoRALayer(layers[prefix].u, torch.zeros(4), layers[prefix].vt, 2.0)
    core.write_trilora(comfy_host.loras / "resize_allzero.safetensors", layers, {})
    _, _, info = run_node(comfy_host, "TriLoRAResize", trilora_name="resize_allzero.safetensors",
                          filename_prefix="resize/allzero", max_rank=1, energy=1.0, save_dtype="fp32")
    assert "rank 4 -> rank 1; no layer holds any energy; saved as " in info


def test_merge_is_exact_when_the_rank_allows_and_optimal_below(comfy_host, tiny):
    core = comfy_host.core
    a = write_trilora_file(comfy_host, tiny, "merge_a.safetensors", rank=4, seed=1)
    b_all = random_layers(core, tiny, rank=3, seed=2)
    b = {p: b_all[p] for p in list(LAYERS)[:3]}  # b adapts only three of the five weights
    core.write_trilora(str(comfy_host.loras / "merge_b.safetensors"), b)
    b = core.read_trilora(str(comfy_host.loras / "merge_b.safetensors")).layers
    slots = dict(trilora_name_1="merge_a.safetensors", weight_1=0.7, trilora_name_2=NONE, weight_2=1.0,
                 trilora_name_3=NONE, weight_3=1.0, trilora_name_4="merge_b.safetensors", weight_4=-0.4)
    merged, name, info = run_node(comfy_host, "TriLoRAMerge", filename_prefix="merge/exact", max_rank=0,
                                  energy=1.0, save_dtype="fp32", **slots)
    assert info == (f"merged 0.7 x merge_a.safetensors, -0.4 x merge_b.safetensors: 5 layers, rank 4-7; "
                    f"saved as {name}")
    for prefix in LAYERS:
        want = 0.7 * delta64(a[prefix]) - (0.4 * delta64(b[prefix]) if prefix in b else 0)
        assert rel(delta64(merged.layers[prefix]), want) < 1e-5
        assert merged.layers[prefix].rank == (7 if prefix in b else 4)
        assert core.is_canonical(merged.layers[prefix])

    cut, _, _ = run_node(comfy_host, "TriLoRAMerge", filename_prefix="merge/cut", max_rank=2, energy=1.0,
                         save_dtype="fp32", **{**slots, "trilora_name_1": NONE, "trilora_1": core.TriLoRAFile(a)})
    for prefix in b:
        full = (0.7 * delta64(a[prefix]) - 0.4 * delta64(b[prefix])).flatten(1)
        sigma = torch.linalg.svdvals(full)
        err = (delta64(cut.layers[prefix]).flatten(1) - full).norm()
        assert abs(float(err) - float(sigma[2:].norm())) < 1e-4 * float(sigma.norm())  # the optimal rank-2 cut


def test_merge_refuses_layers_of_different_shapes_naming_both_files(comfy_host, tiny):
    core = comfy_host.core
    prefix = next(iter(LAYERS))
    core.write_trilora(str(comfy_host.loras / "merge_odd.safetensors"),
                       {prefix: core.TriLoRALayer(torch.randn(8, 2), torch.ones(2), torch.randn(2, 5), 2.0)})
    write_trilora_file(comfy_host, tiny, "merge_ok.safetensors", rank=2)
    with pytest.raises(ValueError) as err:
        run_node(comfy_host, "TriLoRAMerge", filename_prefix="merge/bad", max_rank=0, energy=1.0, save_dtype="fp32",
                 trilora_name_1="merge_ok.safetensors", weight_1=1.0, trilora_name_2="merge_odd.safetensors",
                 weight_2=1.0, trilora_name_3=NONE, weight_3=1.0, trilora_name_4=NONE, weight_4=1.0)
    assert str(err.value) == (f"merge: layer {prefix} has shape [320, 320] in merge_ok.safetensors but [8, 5] in "
                              "merge_odd.safetensors; were they made for different base models?")
    assert not (comfy_host.loras / "merge").exists() or not list((comfy_host.loras / "merge").glob("bad*"))


# --------------------------------------------------------------------------- spectrum


def known_spectrum_layers(core, tiny):
    """Layers whose delta W has singular values exactly (3, 1, 0.1, 0.01): 90% and 99% of the energy
    both need 2 directions."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for prefix in ("lora_unet_down_blocks_0_attentions_0_proj_in", "lora_te_text_model_encoder_layers_0_mlp_fc1"):
        part, key = LAYERS[prefix]
        shape = weight(tiny, part, key).shape
        u = torch.linalg.qr(torch.randn(shape[0], 4, generator=g, dtype=torch.float64))[0]
        v = torch.linalg.qr(torch.randn(int(np.prod(shape[1:])), 4, generator=g, dtype=torch.float64))[0]
        out[prefix] = core.TriLoRALayer(u, torch.tensor([3.0, 1.0, 0.1, 0.01], dtype=torch.float64),
                                        v.T.reshape(4, *shape[1:]), 4.0)
    return out


def test_spectrum_plots_each_group_and_sums_up_effective_ranks(comfy_host, tiny):
    core = comfy_host.core
    core.write_trilora(str(comfy_host.loras / "spectrum.safetensors"), known_spectrum_layers(core, tiny),
                       dtype=torch.float32)
    image, text = run_node(comfy_host, "TriLoRASpectrum", trilora_name="spectrum.safetensors")
    assert image.shape == (1, 768, 1024, 3) and image.dtype == torch.float32
    lines = text.splitlines()
    assert lines[0] == "TriLoRA spectrum of spectrum.safetensors: 2 layers, rank 4"
    # energy 9 + 1 + 0.01 + 0.0001 in each layer, the same in both groups: 50% each
    assert "UNet input blocks         1        4       2.0    2       2.0    2   50.0%" in lines
    assert "Text encoder              1        4       2.0    2       2.0    2   50.0%" in lines
    assert not any(line.startswith("UNet middle block") for line in lines)
    pixels = (image[0].numpy() * 255).round().astype(np.int16)

    def has(color):
        return bool((np.abs(pixels - np.array(color)).sum(axis=-1) == 0).any())

    from_pack = __import__(comfy_host.pack.__name__ + ".nodes.tools.spectrum_plot", fromlist=["COLORS"]).COLORS
    assert has(from_pack["UNet input blocks"]) and has(from_pack["Text encoder"])
    assert not has(from_pack["UNet middle block"]) and not has(from_pack["UNet output blocks"])

    memory = core.TriLoRAFile(known_spectrum_layers(core, tiny))
    _, text2 = run_node(comfy_host, "TriLoRASpectrum", trilora_name=NONE, trilora=memory)
    assert text2.splitlines()[0] == "TriLoRA spectrum of trilora (in memory): 2 layers, rank 4"


# --------------------------------------------------------------------------- block weights


def block_layers(core, tiny):
    """One layer in each UNet block group, one outside them (time embedding) and one in CLIP."""
    keys = {
        "lora_unet_input_blocks_1_1_proj_in": ("unet", "diffusion_model.input_blocks.1.1.proj_in.weight"),
        "lora_unet_middle_block_1_proj_in": ("unet", "diffusion_model.middle_block.1.proj_in.weight"),
        "lora_unet_output_blocks_0_1_proj_in": ("unet", "diffusion_model.output_blocks.0.1.proj_in.weight"),
        "lora_unet_time_embed_0": ("unet", "diffusion_model.time_embed.0.weight"),
        "lora_te_text_model_encoder_layers_0_mlp_fc1": LAYERS["lora_te_text_model_encoder_layers_0_mlp_fc1"],
    }
    g = torch.Generator().manual_seed(4)
    layers = {}
    for prefix, (part, key) in keys.items():
        shape = weight(tiny, part, key).shape
        layers[prefix] = core.TriLoRALayer(torch.randn(shape[0], 2, generator=g) * 0.1, torch.ones(2),
                                           torch.randn(2, *shape[1:], generator=g) * 0.1, 2.0)
    return keys, layers


def test_block_weights_scale_each_part_of_the_model(comfy_host, tiny):
    core = comfy_host.core
    keys, layers = block_layers(core, tiny)
    core.write_trilora(str(comfy_host.loras / "blocks.safetensors"), layers)
    layers = core.read_trilora(str(comfy_host.loras / "blocks.safetensors")).layers
    originals = {p: weight(tiny, part, key).clone() for p, (part, key) in keys.items()}
    model, clip, info = run_node(comfy_host, "TriLoRALoaderBlockWeights", model=tiny.model, clip=tiny.clip,
                                 trilora_name="blocks.safetensors", strength_model=0.8, strength_clip=1.5,
                                 input_blocks=0.5, middle_block=0.0, output_blocks=-1.0, text_encoder=2.0)
    assert info.endswith("; block weights: input_blocks 0.5, middle_block 0, output_blocks -1, text_encoder 2")
    assert "5 of 5 layers matched (UNet 4, CLIP 1)" in info
    mm.load_models_gpu([model, clip.patcher])
    try:
        got = {p: weight(tiny, part, key).clone() for p, (part, key) in keys.items()}
    finally:
        mm.unload_all_models()
    strengths = {"lora_unet_input_blocks_1_1_proj_in": 0.8 * 0.5, "lora_unet_middle_block_1_proj_in": 0.0,
                 "lora_unet_output_blocks_0_1_proj_in": 0.8 * -1.0, "lora_unet_time_embed_0": 0.8,
                 "lora_te_text_model_encoder_layers_0_mlp_fc1": 1.5 * 2.0}
    for prefix, strength in strengths.items():
        want = (originals[prefix].double() + strength * delta64(layers[prefix])).to(originals[prefix].dtype)
        torch.testing.assert_close(got[prefix], want, **tolerance(want.dtype), msg=lambda m, p=prefix: f"{p}: {m}")
    assert torch.equal(got["lora_unet_middle_block_1_proj_in"], originals["lora_unet_middle_block_1_proj_in"])
    assert not any(k == keys["lora_unet_middle_block_1_proj_in"][1] for k in model.patches)


def test_block_weights_of_one_equal_the_plain_loader(comfy_host, tiny):
    write_trilora_file(comfy_host, tiny, "blocks_plain.safetensors", rank=3, seed=9)
    common = dict(model=tiny.model, clip=tiny.clip, trilora_name="blocks_plain.safetensors", strength_model=0.7,
                  strength_clip=-1.1)
    plain = patched(*run_node(comfy_host, "TriLoRALoader", **common)[:2])
    blocks = patched(*run_node(comfy_host, "TriLoRALoaderBlockWeights", **common, input_blocks=1.0,
                               middle_block=1.0, output_blocks=1.0, text_encoder=1.0)[:2])
    for prefix in LAYERS:
        assert torch.equal(blocks[prefix], plain[prefix]), prefix


# --------------------------------------------------------------------------- file names


def test_files_are_never_overwritten(comfy_host, tiny):
    write_trilora_file(comfy_host, tiny, "keep_src.safetensors", rank=2)
    folder = comfy_host.loras / "keep"
    folder.mkdir(exist_ok=True)
    (folder / "mine_00001_.safetensors").write_bytes(b"user file")
    names = [run_node(comfy_host, "TriLoRAResize", trilora_name="keep_src.safetensors", filename_prefix="keep/mine",
                      max_rank=1, energy=1.0, save_dtype="fp16")[1] for _ in range(2)]
    assert names == ["keep/mine_00002_.safetensors", "keep/mine_00003_.safetensors"]
    assert (folder / "mine_00001_.safetensors").read_bytes() == b"user file"
    assert names[0] in comfy_host.folder_paths.get_filename_list("loras")


@pytest.mark.parametrize("prefix, message", [
    ("../outside", "TriLoRAResize: filename_prefix '../outside' leaves the loras folder ('..' or '.' is not "
                   "allowed); use a name such as 'trilora/my_style'"),
    ("/tmp/abs", "TriLoRAResize: filename_prefix '/tmp/abs' is an absolute path; give a name relative to the "
                 "loras folder, such as 'trilora/my_style'"),
    ("bad|name?", "TriLoRAResize: filename_prefix 'bad|name?' has characters that are not allowed in file names: "
                  "'?', '|'; anything but < > : \" \\ | ? * and control characters is, and '/' "
                  "separates subfolders"),
])
def test_unsafe_prefixes_are_refused_before_anything_is_written(comfy_host, tiny, prefix, message):
    write_trilora_file(comfy_host, tiny, "prefix_src.safetensors", rank=2)
    before = sorted(p.name for p in comfy_host.loras.rglob("*"))
    with pytest.raises(ValueError) as err:
        run_node(comfy_host, "TriLoRAResize", trilora_name="prefix_src.safetensors", filename_prefix=prefix,
                 max_rank=1, energy=1.0, save_dtype="fp32")
    assert str(err.value) == message
    assert sorted(p.name for p in comfy_host.loras.rglob("*")) == before


def test_a_tool_without_a_source_says_which_inputs_to_set(comfy_host):
    with pytest.raises(ValueError) as err:
        run_node(comfy_host, "TriLoRASpectrum", trilora_name=NONE)
    assert str(err.value) == "TriLoRASpectrum: choose a file in trilora_name or connect the trilora input"
    with pytest.raises(ValueError) as err:
        run_node(comfy_host, "TriLoRAMerge", filename_prefix="merge/none", max_rank=0, energy=1.0, save_dtype="fp32",
                 **{f"trilora_name_{i}": NONE for i in range(1, 5)}, **{f"weight_{i}": 1.0 for i in range(1, 5)})
    assert str(err.value) == ("TriLoRAMerge: nothing to merge; choose files in trilora_name_1 to trilora_name_4 "
                              "or connect the trilora inputs")


def test_file_choices_are_validated_before_the_graph_runs(comfy_host, tiny):
    write_trilora_file(comfy_host, tiny, "valid_src.safetensors", rank=2)
    mappings = comfy_host.nodes.NODE_CLASS_MAPPINGS
    for node_id in ("TriLoRASpectrum", "TriLoRAResize", "TriLoRAExportLoRA"):
        cls = mappings[node_id]
        assert cls.validate_inputs(trilora_name="valid_src.safetensors") is True
        assert cls.validate_inputs(trilora_name=NONE) is True
        assert cls.validate_inputs(trilora_name="gone.safetensors") == "'gone.safetensors' is not in the loras folder"
    assert mappings["TriLoRAConvertLoRA"].validate_inputs(lora_name="gone.safetensors") == \
        "'gone.safetensors' is not in the loras folder"
    assert mappings["TriLoRAMerge"].validate_inputs(trilora_name_1="valid_src.safetensors", trilora_name_2=NONE,
                                                    trilora_name_3="gone.safetensors", trilora_name_4=NONE) == \
        "'gone.safetensors' is not in the loras folder"
