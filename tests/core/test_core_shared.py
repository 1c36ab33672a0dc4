"""Core pieces the nodes share, tested on their own (no ComfyUI): block groups of
every naming, the kohya export, renaming a file's layers under a key map, the optimizer
side-file, and the small shared facts (rank text, number format, truncation limits)."""
from __future__ import annotations

import pytest
import torch
from core_helpers import random_layer, reference_delta, rel_error
from safetensors import safe_open

from trilora_core import (
    StaleOptimizerFile,
    TriLoRALayer,
    block_group,
    delta_energy,
    depth_layout,
    format_number,
    generator,
    init_layer,
    kohya_prefixes,
    lora_file_bytes,
    lora_metadata,
    make_optimizer,
    optimizer_file_path,
    param_groups,
    rank_range,
    read_adapter_file,
    read_optimizer_file,
    rename_layers,
    spectrum,
    truncate,
    truncation_limits,
    write_lora,
    write_optimizer_file,
    write_trilora,
)


@pytest.mark.parametrize("name, group", [
    ("lora_unet_input_blocks_1_1_proj_in", "UNet input blocks"),
    ("lora_unet_down_blocks_0_resnets_0_conv1", "UNet input blocks"),
    ("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_q", "UNet input blocks"),
    ("diffusion_model.input_blocks.0.0.weight", "UNet input blocks"),
    ("lora_unet_conv_in", "UNet input blocks"),
    ("lora_unet_middle_block_1_proj_in", "UNet middle block"),
    ("lora_unet_mid_block_attentions_0_proj_out", "UNet middle block"),
    ("lora_unet_output_blocks_2_1_proj_out", "UNet output blocks"),
    ("lora_unet_up_blocks_1_resnets_2_conv2", "UNet output blocks"),
    ("diffusion_model.out.2.weight", "UNet output blocks"),
    ("lora_unet_time_embed_0", "UNet other"),
    ("lora_unet_time_embedding_linear_1", "UNet other"),
    ("lora_te_text_model_encoder_layers_0_mlp_fc1", "Text encoder"),
    ("lora_te1_text_model_encoder_layers_0_mlp_fc1", "Text encoder"),
    ("text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1", "Text encoder"),
    ("clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight", "Text encoder"),
    ("lora_te2_text_model_encoder_layers_0_mlp_fc1", "Text encoder 2"),
    ("clip_g.transformer.text_model.encoder.layers.0.mlp.fc1.weight", "Text encoder 2"),
    ("something_else", "Other"),
])
def test_layers_are_grouped_by_model_part_in_every_naming(name, group):
    assert block_group(name) == group


def test_depth_layout_splits_the_given_block_lists_in_thirds_in_forward_order():
    keys = [f"diffusion_model.double_blocks.{i}.img_attn.qkv.weight" for i in range(19)]
    keys += [f"diffusion_model.single_blocks.{i}.linear1.weight" for i in range(38)]
    keys += ["diffusion_model.final_layer.linear.weight", "first_stage_model.decoder.weight"]
    layout = depth_layout(reversed(keys), ("double_blocks", "single_blocks"))
    assert layout.lists == (("double_blocks", 19), ("single_blocks", 38))
    assert layout.describe() == ("input_blocks = double_blocks 0-18, middle_block = single_blocks 0-18, "
                                 "output_blocks = single_blocks 19-37")
    assert block_group("diffusion_model.single_blocks.19.linear1.weight", layout) == "UNet output blocks"
    assert block_group("diffusion_model.final_layer.linear.weight", layout) == "UNet other"
    # Lists the family does not name are not blocks; a UNet has none.
    assert depth_layout(keys, ("blocks",)) is None
    early = depth_layout(["diffusion_model.noise_refiner.0.w", "diffusion_model.layers.0.w",
                          "diffusion_model.layers.1.w", "diffusion_model.layers.2.w"], ("layers",), ("noise_refiner",))
    assert early.early == ("noise_refiner",) and early.group("noise_refiner_0_") == "UNet input blocks"


def test_rank_text_and_numbers_read_the_same_everywhere():
    assert rank_range([4, 4, 4]) == "4"
    assert rank_range([8, 2, 4]) == "2-8"
    assert (format_number(8.0), format_number(0.5), format_number(1e-7)) == ("8", "0.5", "1e-07")


def test_truncation_limits_keep_everything_at_the_nodes_defaults():
    assert truncation_limits(0, 1.0) == {"rank": None, "energy": None}
    assert truncation_limits(4, 0.9) == {"rank": 4, "energy": 0.9}
    layer = random_layer(12, 10, (), 6, seed=1, zero_tail=2)
    # energy 1.0 must not drop the exact zeros a "fewest holding 100%" rule would
    assert truncate(layer, **truncation_limits(0, 1.0)).rank == 6
    assert truncate(layer, **truncation_limits(3, 1.0)).rank == 3


def test_delta_energy_is_the_squared_frobenius_norm_of_delta_w():
    layer = random_layer(9, 7, (3, 3), 4, seed=2)
    want = float(reference_delta(layer).double().square().sum())
    assert delta_energy(layer) == pytest.approx(want, rel=1e-5)
    assert delta_energy(layer) == pytest.approx(float((spectrum(layer).double() ** 2).sum()))


@pytest.mark.parametrize("kernel", [(), (3, 3)])
def test_the_kohya_export_keeps_the_weight_change(tmp_path, kernel):
    layers = {"lora_unet_a": random_layer(16, 12, kernel, 4, seed=3, alpha=2.0),
              "lora_unet_b": random_layer(8, 12, (), 2, seed=4, alpha=8.0)}
    meta = lora_metadata(layers, {"modelspec.architecture": "stable-diffusion-v1/trilora"}, "out", "why")
    path = write_lora(tmp_path / "x.safetensors", layers, meta)
    with safe_open(path, "pt") as f:
        keys, written = set(f.keys()), f.metadata()
    assert keys == {f"{p}.{k}" for p in layers for k in ("lora_up.weight", "lora_down.weight", "alpha")}
    assert written["ss_network_module"] == "networks.lora" and written["ss_network_dim"] == "4"
    assert written["ss_network_alpha"] == "2" and written["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert ("ss_network_args" in written) == bool(kernel)
    read = read_adapter_file(path)
    for prefix, layer in layers.items():
        assert rel_error(reference_delta(read.layers[prefix]), reference_delta(layer)) < 1e-5


def test_a_kohya_export_that_overflows_its_dtype_names_the_tensor():
    layer = TriLoRALayer(torch.eye(2), torch.tensor([1e12, 1.0]), torch.eye(2), 2.0)
    with pytest.raises(ValueError, match=r"lora_unet_a\.lora_(up|down)\.weight does not fit in float16"):
        lora_file_bytes({"lora_unet_a": layer}, {}, torch.float16)


KEY_MAP = {  # ComfyUI-style: generic and kohya names, a diffusers alias for one weight
    "diffusion_model.in.0": "diffusion_model.in.0.weight",
    "lora_unet_in_0": "diffusion_model.in.0.weight",
    "lora_unet_down_blocks_0_conv": "diffusion_model.in.0.weight",
    "diffusion_model.mid": "diffusion_model.mid.weight",
    "lora_unet_mid": "diffusion_model.mid.weight",
}
SHAPES = {"diffusion_model.in.0.weight": (6, 5), "diffusion_model.mid.weight": (4, 6)}


def test_renaming_takes_each_weights_chosen_name_and_adds_aliases_exactly():
    a, b = random_layer(6, 5, (), 2, seed=5), random_layer(6, 5, (), 3, seed=6)
    layers = {"diffusion_model.in.0": a, "lora_unet_in_0": b, "unknown_layer": random_layer(3, 3, (), 1, seed=7)}
    kohya = kohya_prefixes(KEY_MAP)
    assert kohya["diffusion_model.in.0.weight"] == "lora_unet_down_blocks_0_conv"
    out, unknown, aliases = rename_layers(layers, KEY_MAP, SHAPES, kohya)
    assert sorted(out) == ["lora_unet_down_blocks_0_conv", "unknown_layer"] and unknown == ["unknown_layer"]
    assert aliases == [["diffusion_model.in.0", "lora_unet_in_0"]]
    summed = reference_delta(a) + reference_delta(b)
    assert rel_error(reference_delta(out["lora_unet_down_blocks_0_conv"]), summed) < 1e-5
    with pytest.raises(ValueError, match="was the adapter made for another base model"):
        rename_layers({"lora_unet_mid": random_layer(5, 5, (), 1, seed=8)}, KEY_MAP, SHAPES, {})
    taken = {"lora_unet_in_0": a, "lora_unet_mid_x": a}
    with pytest.raises(ValueError, match="another layer is saved under that name"):
        rename_layers(taken, KEY_MAP, SHAPES, {"diffusion_model.in.0.weight": "lora_unet_mid_x"})


def test_without_a_key_map_only_aliases_by_name_are_folded():
    layers = {"lora_unet_x": random_layer(4, 4, (), 1, seed=9)}
    assert rename_layers(layers, None, {}, {}) == (layers, [], [])


def _optimizer(seed: int):
    layers = {"p": init_layer((6, 5), 2, generator(seed, "init"), alpha=2.0)}
    factors = {k: tuple(t.clone().requires_grad_(True) for t in (v.u, v.s, v.vt)) for k, v in layers.items()}
    groups = param_groups(factors, {"p": (6, 5)}, 1e-2, 1.0)
    optimizer = make_optimizer("Adam", groups)
    sum(t.square().sum() for f in factors.values() for t in f).backward()
    optimizer.step()
    return layers, optimizer


def test_the_optimizer_side_file_round_trips_and_refuses_another_version(tmp_path):
    layers, optimizer = _optimizer(0)
    path = tmp_path / "ckpt_00001_step000001.safetensors"
    assert read_optimizer_file(write_trilora(path, layers), layers) is None  # no side-file yet
    side = write_optimizer_file(path, optimizer, "Adam")
    assert side == optimizer_file_path(path) == str(tmp_path / "ckpt_00001_step000001.optim")
    raw, tensors = read_optimizer_file(path, layers)
    u, s, vt = optimizer.param_groups[0]["params"][0], optimizer.param_groups[1]["params"][0], \
        optimizer.param_groups[0]["params"][1]
    assert torch.equal(raw["p"].u, u.detach()) and torch.equal(raw["p"].s, s.detach())
    assert torch.equal(raw["p"].vt, vt.detach()) and raw["p"].alpha == layers["p"].alpha
    assert any(k.startswith("state.p.trilora_s.") for k in tensors)
    write_trilora(path, {"p": init_layer((6, 5), 2, generator(1, "init"))})  # the file changes
    with pytest.raises(StaleOptimizerFile):
        read_optimizer_file(path, layers)
