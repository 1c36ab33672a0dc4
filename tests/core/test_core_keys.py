from __future__ import annotations

import pytest
import torch
from core_helpers import random_layer

from trilora_core import TriLoRALayer, prefix_for_weight, prefixes_by_weight, weight_for_prefix
from trilora_core.key_map import Target, layers_by_weight, lookup, target_of

PROJ_IN = "diffusion_model.input_blocks.1.1.proj_in.weight"
TO_Q = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
FC1 = "clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
QKV = "diffusion_model.double_blocks.0.img_attn.qkv.weight"

# A hand-written sample of ComfyUI's SD1.5 key map (many aliases per weight).
SD15_MAP: dict[str, str | tuple] = {
    "lora_unet_input_blocks_1_1_proj_in": PROJ_IN,
    "diffusion_model.input_blocks.1.1.proj_in": PROJ_IN,
    "lora_unet_down_blocks_0_attentions_0_proj_in": PROJ_IN,
    "lycoris_down_blocks_0_attentions_0_proj_in": PROJ_IN,
    "down_blocks.0.attentions.0.proj_in": PROJ_IN,
    "unet.down_blocks.0.attentions.0.proj_in": PROJ_IN,
    "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q": TO_Q,
    "text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1": FC1,
    "lora_te_text_model_encoder_layers_0_mlp_fc1": FC1,
    "lora_te1_text_model_encoder_layers_0_mlp_fc1": FC1,
    "text_encoder.text_model.encoder.layers.0.mlp.fc1": FC1,
}


def test_unet_prefers_kohya_name_derived_from_the_weight() -> None:
    assert prefix_for_weight(PROJ_IN, SD15_MAP) == "lora_unet_input_blocks_1_1_proj_in"
    # Without the derived name, another kohya alias.
    reduced = {k: v for k, v in SD15_MAP.items() if k != "lora_unet_input_blocks_1_1_proj_in"}
    assert prefix_for_weight(PROJ_IN, reduced) == "lora_unet_down_blocks_0_attentions_0_proj_in"


def test_generic_name_when_no_kohya_alias() -> None:
    assert prefix_for_weight(TO_Q, SD15_MAP) == "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q"
    clip_only_generic = {"text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1": FC1}
    assert prefix_for_weight(FC1, clip_only_generic) == (
        "text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1"
    )
    # Unknown weight: its key without ".weight".
    assert prefix_for_weight("diffusion_model.out.2.weight", SD15_MAP) == "diffusion_model.out.2"
    # Only a non-generic alias: that alias (ComfyUI can load it), never a name it does not know.
    assert prefix_for_weight(FC1, {"text_encoder.text_model.encoder.layers.0.mlp.fc1": FC1}) == (
        "text_encoder.text_model.encoder.layers.0.mlp.fc1"
    )


def test_text_encoder_sd15_vs_sdxl() -> None:
    assert prefix_for_weight(FC1, SD15_MAP) == "lora_te_text_model_encoder_layers_0_mlp_fc1"
    fc1_g = "clip_g.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
    sdxl = dict(SD15_MAP)
    sdxl["lora_te2_text_model_encoder_layers_0_mlp_fc1"] = fc1_g
    sdxl["text_encoders.clip_g.transformer.text_model.encoder.layers.0.mlp.fc1"] = fc1_g
    assert prefix_for_weight(FC1, sdxl) == "lora_te1_text_model_encoder_layers_0_mlp_fc1"
    assert prefix_for_weight(fc1_g, sdxl) == "lora_te2_text_model_encoder_layers_0_mlp_fc1"


def test_tuple_values() -> None:
    key_map: dict[str, str | tuple] = {
        "lora_transformer_single_transformer_blocks_0_attn_to_q": (QKV, (0, 0, 3072)),
        "diffusion_model.double_blocks.0.img_attn.qkv": QKV,
        "lora_unet_double_blocks_0_img_attn_qkv": (QKV,),
        "lora_other_whole": (QKV, None),
    }
    # A slice alias never names the whole weight; (key,) and (key, None) do.
    assert prefix_for_weight(QKV, key_map) == "lora_unet_double_blocks_0_img_attn_qkv"
    assert weight_for_prefix("lora_transformer_single_transformer_blocks_0_attn_to_q", key_map) == QKV
    assert weight_for_prefix("lora_unet_double_blocks_0_img_attn_qkv", key_map) == QKV
    only_slices = {"lora_transformer_x": (QKV, (0, 0, 3072))}
    assert prefix_for_weight(QKV, only_slices) == "diffusion_model.double_blocks.0.img_attn.qkv"
    assert prefixes_by_weight(only_slices) == {}


def test_other_kohya_prefixes() -> None:
    key_map = {"transformer.x.to_q": "diffusion_model.x.weight", "lora_transformer_x_to_q": "diffusion_model.x.weight"}
    assert prefix_for_weight("diffusion_model.x.weight", key_map) == "lora_transformer_x_to_q"


def test_weight_for_prefix() -> None:
    assert weight_for_prefix("lora_unet_down_blocks_0_attentions_0_proj_in", SD15_MAP) == PROJ_IN
    assert weight_for_prefix("lora_te_text_model_encoder_layers_0_mlp_fc1", SD15_MAP) == FC1
    assert weight_for_prefix("lora_unet_nothing", SD15_MAP) is None


def test_prefixes_by_weight_matches_prefix_for_weight_and_is_deterministic() -> None:
    chosen = prefixes_by_weight(SD15_MAP)
    assert set(chosen) == {PROJ_IN, TO_Q, FC1}
    for weight, prefix in chosen.items():
        assert prefix == prefix_for_weight(weight, SD15_MAP)
        assert weight_for_prefix(prefix, SD15_MAP) == weight
    reversed_map = dict(reversed(list(SD15_MAP.items())))
    assert prefixes_by_weight(reversed_map) == chosen


# --------------------------------------------------------------------------- resolution (trilora_core.key_map)

def swap_halves(t: torch.Tensor) -> torch.Tensor:
    """What ComfyUI's swap_scale_shift does to a delta: its two row halves swapped."""
    shift, scale = t.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)


def delta(layer: TriLoRALayer) -> torch.Tensor:
    return layer.delta(torch.float64)


def assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal up to float32 rounding (the folded layer is canonicalized in float32)."""
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_target_of_reads_every_form_comfyui_key_maps_produce() -> None:
    assert target_of("w.weight") == Target("w.weight")
    assert target_of(("w.weight", (0, 4, 2))) == Target("w.weight", (0, 4, 2))
    assert target_of(("w.weight", None, swap_halves)) == Target("w.weight", None, swap_halves)
    assert target_of(("w.weight", (0, 0, 2), swap_halves)) == Target("w.weight", (0, 0, 2), swap_halves)
    assert target_of(None) is None and target_of((1, 2)) is None and target_of(("w", "bad")) is None


def test_lookup_knows_peft_attention_names_without_processor() -> None:
    key_map = {"unet.a.attn1.processor.to_q": "q.weight", "unet.a.attn1.processor.to_out": "o.weight"}
    assert lookup("unet.a.attn1.to_q", key_map) == ("q.weight", Target("q.weight"))
    assert lookup("unet.a.attn1.to_out.0", key_map) == ("o.weight", Target("o.weight"))
    assert lookup("unet.a.attn1.to_k", key_map) is None


def test_slices_and_functions_fold_into_whole_weight_layers_exactly() -> None:
    q, k, v = (random_layer(4, 5, (), 2, seed=s) for s in (1, 2, 3))
    key_map = {
        "t.to_q": ("qkv.weight", (0, 0, 4)),
        "t.to_k": ("qkv.weight", (0, 4, 4)),
        "t.to_v": ("qkv.weight", (0, 8, 4)),
        "t.norm_out": ("norm.weight", None, swap_halves),
    }
    norm = random_layer(6, 5, (), 3, seed=4)
    shapes = {"qkv.weight": (12, 5), "norm.weight": (6, 5)}
    resolved = layers_by_weight({"t.to_q": q, "t.to_k": k, "t.to_v": v, "t.norm_out": norm}, key_map, shapes)
    assert resolved.unknown == [] and resolved.sources["qkv.weight"] == ["t.to_k", "t.to_q", "t.to_v"]
    assert_same(delta(resolved.layers["qkv.weight"]), torch.cat([delta(q), delta(k), delta(v)]))
    assert_same(delta(resolved.layers["norm.weight"]), swap_halves(delta(norm)))


def test_aliases_of_one_weight_are_summed_and_reported() -> None:
    a, b = random_layer(6, 5, (), 2, seed=1), random_layer(6, 5, (), 3, seed=2)
    key_map = {"lora_unet_x": "x.weight", "unet.x": "x.weight"}
    resolved = layers_by_weight({"lora_unet_x": a, "unet.x": b, "lora_unet_gone": a}, key_map, {"x.weight": (6, 5)})
    assert_same(delta(resolved.layers["x.weight"]), delta(a) + delta(b))
    assert resolved.aliases() == {"x.weight": ["lora_unet_x", "unet.x"]}
    assert resolved.unknown == ["lora_unet_gone"]


def test_a_layer_that_does_not_fit_its_weight_is_named() -> None:
    with pytest.raises(ValueError) as err:
        layers_by_weight({"p": random_layer(6, 4, (), 2, seed=1)}, {"p": ("w.weight", (0, 0, 6))}, {"w.weight": (12, 5)})
    assert str(err.value) == "p: layer shape [6, 4] does not fit the model's w.weight[12, 5] slice (0, 0, 6)"


# --------------------------------------------------------------------------- other trainers' namings


def test_diffusers_names_are_peft_module_names_whole_or_row_slices():
    from trilora_core import diffusers_prefixes

    key_map = {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0": "diffusion_model.a.to_out.0.weight",
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out": "diffusion_model.a.to_out.0.weight",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out": "diffusion_model.a.to_out.0.weight",
        # Flux: one fused qkv weight, three diffusers names on its rows; a function-mapped name is left out
        "transformer.transformer_blocks.0.attn.to_v": ("diffusion_model.qkv.weight", (0, 8, 4)),
        "transformer.transformer_blocks.0.attn.to_q": ("diffusion_model.qkv.weight", (0, 0, 4)),
        "transformer.transformer_blocks.0.attn.to_k": ("diffusion_model.qkv.weight", (0, 4, 4)),
        "transformer.norm_out.linear": ("diffusion_model.final.weight", None, lambda t: t),
        "text_encoder.text_model.encoder.layers.0.mlp.fc1": "clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight",
    }
    assert diffusers_prefixes(key_map) == {
        "clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight":
            [("text_encoder.text_model.encoder.layers.0.mlp.fc1", None)],
        "diffusion_model.a.to_out.0.weight": [("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0", None)],
        "diffusion_model.qkv.weight": [("transformer.transformer_blocks.0.attn.to_q", (0, 0, 4)),
                                       ("transformer.transformer_blocks.0.attn.to_k", (0, 4, 4)),
                                       ("transformer.transformer_blocks.0.attn.to_v", (0, 8, 4))],
    }


def test_row_slices_stack_to_the_layer_exactly_and_must_cover_it():
    from trilora_core import split_rows

    layer = random_layer(12, 5, (), 3, seed=4)
    parts = [("q", (0, 0, 4)), ("k", (0, 4, 4)), ("v", (0, 8, 4))]
    split = split_rows(layer, parts, "qkv")
    assert torch.equal(torch.cat([split[n].delta() for n in "qkv"]), layer.delta())
    assert split_rows(layer, [("w", None)], "w") == {"w": layer}
    with pytest.raises(ValueError, match=r"the diffusers names of qkv \(q, v\) do not cover its 12 rows"):
        split_rows(layer, [parts[0], parts[2]], "qkv")


def test_peft_factors_fold_alpha_into_scale_one():
    from trilora_core import PEFT, lora_tensors

    layer = random_layer(6, 5, (), 3, seed=5, alpha=1.5)
    tensors = lora_tensors({"unet.x": layer}, torch.float32, PEFT)
    assert sorted(tensors) == ["unet.x.lora_A.weight", "unet.x.lora_B.weight"]  # no alpha: scale 1
    delta = tensors["unet.x.lora_B.weight"].double() @ tensors["unet.x.lora_A.weight"].double()
    torch.testing.assert_close(delta, layer.delta().double(), rtol=1e-6, atol=1e-7)
