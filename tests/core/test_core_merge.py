"""merge_layers / merge_files: weighted sums of TriLoRAs, exact while the rank allows, optimal below."""

from __future__ import annotations

import pytest
import torch
from core_helpers import KERNELS, PROPERTY, max_orthonormality_error, random_layer, reference_delta, rel_error
from hypothesis import given
from hypothesis import strategies as st

from trilora_core import TriLoRALayer, alias_groups, fold_aliases, is_canonical, merge_files, merge_layers, spectrum
from trilora_core.suffixes import alias_key


@st.composite
def weighted_layers(draw):
    """2-3 layers adapting the same weight, various ranks, storage dtypes float32/float64, and weights."""
    out, in_features = draw(st.integers(1, 16)), draw(st.integers(1, 16))
    kernel = draw(st.sampled_from(KERNELS))
    n = draw(st.integers(2, 3))
    pairs = []
    for _ in range(n):
        layer = random_layer(out, in_features, kernel, rank=draw(st.integers(1, 6)),
                             seed=draw(st.integers(0, 2**31 - 1)),
                             dtype=draw(st.sampled_from((torch.float32, torch.float64))),
                             alpha=draw(st.sampled_from((1.0, 4.0, 0.5))))
        pairs.append((layer, draw(st.sampled_from((1.0, 0.5, -0.7, 2.0, 0.0)))))
    return pairs


def weighted_sum(pairs) -> torch.Tensor:
    return sum(w * reference_delta(layer) for layer, w in pairs)


@PROPERTY
@given(pairs=weighted_layers())
def test_merge_is_exact_when_the_rank_is_not_cut(pairs) -> None:
    if all(w == 0 for _, w in pairs):
        pairs[0] = (pairs[0][0], 1.0)
    merged = merge_layers(pairs)
    want = weighted_sum(pairs)
    live = [layer for layer, w in pairs if w != 0]
    assert merged.rank <= min(sum(layer.rank for layer in live), merged.out_features, want[0].numel())
    assert merged.weight_shape == live[0].weight_shape
    assert merged.scale == pytest.approx(1.0)
    norm = sum(abs(w) * float(reference_delta(layer).norm()) for layer, w in pairs)
    assert float((reference_delta(merged) - want).norm()) <= 2e-5 * norm + 1e-12
    assert is_canonical(merged) and max_orthonormality_error(merged) < 1e-4
    expected_dtype = torch.float64 if any(layer.u.dtype == torch.float64 for layer in live) else torch.float32
    assert merged.u.dtype == expected_dtype


@PROPERTY
@given(pairs=weighted_layers(), cut=st.integers(1, 4))
def test_a_cut_merge_is_the_best_approximation_of_the_sum(pairs, cut: int) -> None:
    pairs = [(layer, w if w != 0 else 1.0) for layer, w in pairs]
    merged = merge_layers(pairs, rank=cut)
    want = weighted_sum(pairs)
    sigma = torch.linalg.svdvals(want.reshape(want.shape[0], -1))
    k = merged.rank
    assert k == min(cut, merge_layers(pairs).rank)
    error = float((reference_delta(merged) - want).norm())
    assert error == pytest.approx(float(sigma[k:].norm()), abs=2e-5 * float(sigma.norm()) + 1e-12)


def test_merge_of_a_layer_with_itself_adds_the_weights() -> None:
    layer = random_layer(10, 6, (3, 3), rank=3, seed=1, alpha=2.0)
    merged = merge_layers([(layer, 0.25), (layer, 0.5)])
    assert merged.rank == 3  # the same directions: no rank growth
    assert rel_error(reference_delta(merged), 0.75 * reference_delta(layer)) < 1e-5
    torch.testing.assert_close(spectrum(merged), 0.75 * spectrum(layer), rtol=1e-5, atol=1e-6)


def test_energy_cut_and_zero_weights() -> None:
    a = random_layer(12, 9, (), rank=4, seed=2)
    b = random_layer(12, 9, (), rank=4, seed=3)
    assert merge_layers([(a, 1.0), (b, 0.0)]).rank == 4  # weight 0: left out entirely
    full = merge_layers([(a, 1.0), (b, 1.0)])
    by_energy = merge_layers([(a, 1.0), (b, 1.0)], energy=0.5)
    s2 = full.s.double() ** 2
    share = torch.cumsum(s2, 0) / s2.sum()
    assert by_energy.rank == int((share >= 0.5).nonzero()[0, 0]) + 1


def test_merge_files_takes_the_union_of_layers() -> None:
    a = {"x": random_layer(5, 4, (), 2, seed=1), "y": random_layer(6, 3, (1, 1), 2, seed=2)}
    b = {"y": random_layer(6, 3, (1, 1), 3, seed=3), "z": random_layer(4, 4, (), 1, seed=4)}
    merged = merge_files([(a, 2.0), (b, -1.0)])
    assert sorted(merged) == ["x", "y", "z"]
    assert rel_error(reference_delta(merged["x"]), 2 * reference_delta(a["x"])) < 1e-5
    assert rel_error(reference_delta(merged["y"]), 2 * reference_delta(a["y"]) - reference_delta(b["y"])) < 1e-5
    assert rel_error(reference_delta(merged["z"]), -reference_delta(b["z"])) < 1e-5
    assert sorted(merge_files([(a, 1.0), (b, 0.0)])) == ["x", "y"]  # a source of weight 0 adds nothing


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: merge_layers([]), "merge_layers: nothing to merge"),
        (lambda: merge_layers([(random_layer(4, 3, (), 2, seed=0), 0.0)]),
         "merge_layers: every weight is 0, so the merge is empty"),
        (lambda: merge_layers([(random_layer(4, 3, (), 2, seed=0), 1.0), (random_layer(4, 5, (), 2, seed=0), 1.0)]),
         "merge_layers: layers adapt weights of different shapes: [4, 3] and [4, 5]"),
        (lambda: merge_layers([(random_layer(4, 3, (), 2, seed=0), float("nan"))]),
         "merge_layers: weights must be finite numbers, got nan"),
        (lambda: merge_files([]), "merge: nothing to merge"),
        (lambda: merge_files([({"p": random_layer(4, 3, (), 2, seed=0)}, 0.0)]),
         "merge: every weight is 0, so the merge is empty"),
        (lambda: merge_files([({"p": random_layer(4, 3, (), 2, seed=0)}, 1.0),
                              ({"p": random_layer(4, 3, (3, 3), 2, seed=0)}, 1.0)]),
         "merge: layer p has shape [4, 3] in input 1 but [4, 3, 3, 3] in input 2; "
         "were they made for different base models?"),
        (lambda: merge_files([({"p": random_layer(4, 3, (), 2, seed=0)}, 1.0)], names=["a", "b"]),
         "merge: one name per source expected"),
    ],
)
def test_bad_merges_are_refused_with_a_clear_message(call, message: str) -> None:
    with pytest.raises(ValueError) as err:
        call()
    assert str(err.value) == message


def test_half_precision_inputs_merge_in_float32() -> None:
    a = random_layer(8, 8, (), 3, seed=5, dtype=torch.float16)
    b = random_layer(8, 8, (), 3, seed=6, dtype=torch.bfloat16)
    merged = merge_layers([(a, 1.0), (b, 1.0)])
    assert merged.u.dtype == torch.float32
    assert rel_error(reference_delta(merged), reference_delta(a) + reference_delta(b)) < 1e-5
    assert isinstance(merged, TriLoRALayer)


# One weight under two names (kohya and diffusers/PEFT conventions), in one file or across files.
KOHYA = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"
PEFT = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"
PROCESSOR = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out"


def test_merge_adds_aliases_across_files() -> None:
    a = {KOHYA: random_layer(6, 5, (), 2, seed=1)}
    b = {PEFT: random_layer(6, 5, (), 3, seed=2)}
    merged = merge_files([(a, 1.0), (b, 0.5)])
    assert list(merged) == [KOHYA]  # the first source's name
    want = reference_delta(a[KOHYA]) + 0.5 * reference_delta(b[PEFT])
    assert rel_error(reference_delta(merged[KOHYA]), want) < 1e-5


def test_merge_adds_aliases_within_one_file() -> None:
    layers = {KOHYA: random_layer(6, 5, (), 2, seed=1), PROCESSOR: random_layer(6, 5, (), 2, seed=2)}
    merged = merge_files([(layers, 2.0)])
    assert list(merged) == [KOHYA]
    want = 2 * (reference_delta(layers[KOHYA]) + reference_delta(layers[PROCESSOR]))
    assert rel_error(reference_delta(merged[KOHYA]), want) < 1e-5
    assert alias_groups(layers) == [[KOHYA, PROCESSOR]]
    folded = fold_aliases(layers)
    assert list(folded) == [KOHYA]
    assert rel_error(reference_delta(folded[KOHYA]), want / 2) < 1e-5


def test_aliases_whose_shapes_disagree_are_refused_naming_both() -> None:
    with pytest.raises(ValueError) as err:
        merge_files([({KOHYA: random_layer(6, 5, (), 2, seed=1)}, 1.0), ({PEFT: random_layer(6, 4, (), 2, seed=2)}, 1.0)])
    assert str(err.value) == (
        f"merge: layers {KOHYA} and {PEFT}, one weight, have shape [6, 5] in input 1 but [6, 4] in input 2; "
        "were they made for different base models?"
    )


@pytest.mark.parametrize(
    "a, b",
    [
        ("lora_te_text_model_encoder_layers_0_mlp_fc1", "text_encoder.text_model.encoder.layers.0.mlp.fc1"),
        ("lora_te2_text_model_encoder_layers_0_mlp_fc1", "text_encoder_2.text_model.encoder.layers.0.mlp.fc1"),
        ("lora_transformer_single_transformer_blocks_0_attn_to_q", "transformer.single_transformer_blocks.0.attn.to_q"),
        ("lycoris_blocks_0_self_attn_q", "diffusion_model.blocks.0.self_attn.q"),
        ("lora_unet_blocks_0_self_attn_q", "diffusion_model.blocks.0.self_attn.q"),
    ],
)
def test_alias_key_joins_the_conventions_of_one_weight(a: str, b: str) -> None:
    assert alias_key(a) == alias_key(b)


def test_alias_key_keeps_different_weights_and_parts_apart() -> None:
    names = ["lora_te_text_model_encoder_layers_0_mlp_fc1", "lora_te2_text_model_encoder_layers_0_mlp_fc1",
             "lora_te1_text_model_encoder_layers_0_mlp_fc1", "lora_unet_text_model_encoder_layers_0_mlp_fc1",
             "lora_unet_blocks_0_self_attn_q", "lora_unet_blocks_0_self_attn_k", "something.else"]
    assert len({alias_key(n) for n in names}) == len(names)
