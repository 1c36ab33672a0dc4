from __future__ import annotations

import pytest
import torch
from core_helpers import PROPERTY, delta_tolerance, lora_delta, random_layer, reference_delta, rel_error
from hypothesis import given
from hypothesis import strategies as st

from trilora_core import TriLoRALayer, is_canonical, lora_to_trilora, trilora_to_lora


@st.composite
def lora_pairs(draw):
    """(up, down, alpha): linear LoRA or LoCon conv (up [out, r, 1, 1]), any rank vs dims."""
    out, in_features, rank = draw(st.integers(1, 16)), draw(st.integers(1, 16)), draw(st.integers(1, 10))
    kernel = draw(st.sampled_from(((), (1, 1), (3, 3), (3,))))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    up = torch.randn(out, rank, *(1,) * len(kernel), generator=gen)
    down = torch.randn(rank, in_features, *kernel, generator=gen)
    alpha = draw(st.sampled_from((None, 1.0, 8.0, 0.25)))
    return up, down, alpha


@PROPERTY
@given(pair=lora_pairs(), fold=st.sampled_from(("split", "up", "down")))
def test_lora_round_trip(pair, fold: str) -> None:
    up, down, alpha = pair
    expected = lora_delta(up, down, alpha)
    layer = lora_to_trilora(up, down, alpha)
    rank = up.shape[1]
    assert layer.rank <= rank
    assert layer.weight_shape == tuple(expected.shape)
    assert is_canonical(layer)
    stand_in = TriLoRALayer(u=up.flatten(1), s=torch.ones(rank), vt=down, alpha=rank if alpha is None else alpha)
    assert rel_error(reference_delta(layer), expected) < delta_tolerance(stand_in)

    up2, down2, alpha2 = trilora_to_lora(layer, fold=fold)
    assert alpha2 == layer.alpha
    assert down2.shape == layer.vt.shape
    assert up2.shape == (layer.out_features, layer.rank, *(1,) * (down.ndim - 2))
    assert rel_error(lora_delta(up2, down2, alpha2), expected) < delta_tolerance(stand_in) + 1e-5


@pytest.mark.parametrize("fold", ["split", "up", "down"])
def test_trilora_to_lora_folds(fold: str) -> None:
    # Non-canonical layer with negative s: still exact.
    layer = random_layer(out=5, in_features=3, kernel=(3, 3), rank=4, seed=3, alpha=2.0)
    up, down, alpha = trilora_to_lora(layer, fold=fold)
    assert up.shape == (5, 4, 1, 1)
    assert down.shape == (4, 3, 3, 3)
    assert alpha == 2.0
    assert rel_error(lora_delta(up, down, alpha), reference_delta(layer)) < 1e-6


def test_trilora_to_lora_linear_and_1d_3d_layouts() -> None:
    assert trilora_to_lora(random_layer(4, 3, (), 2, seed=0))[0].shape == (4, 2)
    assert trilora_to_lora(random_layer(4, 3, (3,), 2, seed=0))[0].shape == (4, 2, 1)
    assert trilora_to_lora(random_layer(4, 3, (1, 2, 3), 2, seed=0))[0].shape == (4, 2, 1, 1, 1)


def test_trilora_to_lora_split_balances_factors() -> None:
    s = torch.tensor([4.0, 1.0])
    layer = TriLoRALayer(u=torch.eye(3, 2), s=s, vt=torch.eye(2, 3), alpha=2.0)
    up, down, _ = trilora_to_lora(layer)
    assert torch.allclose(up, torch.eye(3, 2) * torch.tensor([2.0, 1.0]))
    assert torch.allclose(down, torch.eye(2, 3) * torch.tensor([[2.0], [1.0]]))


def test_trilora_to_lora_keeps_dtype() -> None:
    layer = random_layer(4, 3, (), 2, seed=0, dtype=torch.bfloat16)
    up, down, _ = trilora_to_lora(layer)
    assert up.dtype == down.dtype == torch.bfloat16


def test_lora_to_trilora_alpha_default_and_rank_cap() -> None:
    up, down = torch.randn(2, 6), torch.randn(6, 3)  # rank 6 above out=2
    layer = lora_to_trilora(up, down)
    assert layer.rank == 2
    assert layer.alpha == 2.0  # alpha = r = 6, scaled by 2 / 6
    assert rel_error(reference_delta(layer), lora_delta(up, down, None)) < 1e-5
    assert lora_to_trilora(up, down, torch.tensor(3.0)).alpha == 1.0  # tensor alpha accepted


def test_lora_to_trilora_keeps_dtype() -> None:
    layer = lora_to_trilora(torch.randn(4, 2).half(), torch.randn(2, 5).half(), 2.0)
    assert layer.u.dtype == layer.s.dtype == layer.vt.dtype == torch.float16


@pytest.mark.parametrize(
    ("up", "down", "kwargs", "message"),
    [
        (
            (4, 2, 1, 1),
            (2, 3, 3, 3),
            {"mid": torch.zeros(2, 2, 3, 3)},
            "LoCon Tucker decomposition (lora_mid) is not supported: its delta W is not a rank-r matrix, "
            "so it cannot be converted exactly; load the file with ComfyUI's LoraLoader",
        ),
        ((4,), (2, 3), {}, "lora_up must be [out, rank] or [out, rank, 1, 1], got shape [4]"),
        ((4, 2, 3, 3), (2, 3), {}, "lora_up must be [out, rank] or [out, rank, 1, 1], got shape [4, 2, 3, 3]"),
        ((4, 2), (2,), {}, "lora_down must be [rank, in] or [rank, in, *kernel], got shape [2]"),
        ((4, 2), (3, 5), {}, "LoRA ranks disagree: lora_up has shape [4, 2], lora_down has shape [3, 5]"),
    ],
)
def test_lora_to_trilora_invalid(up, down, kwargs, message: str) -> None:
    with pytest.raises(ValueError) as err:
        lora_to_trilora(torch.zeros(up), torch.zeros(down), **kwargs)
    assert str(err.value) == message


def test_trilora_to_lora_invalid_fold() -> None:
    with pytest.raises(ValueError) as err:
        trilora_to_lora(random_layer(3, 3, (), 1, seed=0), fold="middle")
    assert str(err.value) == "trilora_to_lora: fold must be one of split, up, down; got 'middle'"
