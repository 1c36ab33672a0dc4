"""extract_layer: the best TriLoRA of a given rank / energy for a full weight difference."""

from __future__ import annotations

import math

import pytest
import torch
from core_helpers import KERNELS, PROPERTY, max_orthonormality_error, reference_delta, rel_error
from hypothesis import given
from hypothesis import strategies as st

from trilora_core import energy_rank, extract_layer, is_canonical, kept_energy


def low_rank_delta(out: int, in_features: int, kernel: tuple[int, ...], rank: int, seed: int,
                   dtype=torch.float32) -> torch.Tensor:
    """A delta of exactly ``rank`` (when the dimensions allow), shaped like a weight."""
    g = torch.Generator().manual_seed(seed)
    up = torch.randn(out, rank, generator=g, dtype=torch.float64)
    down = torch.randn(rank, in_features * math.prod(kernel), generator=g, dtype=torch.float64)
    return (up @ down).reshape(out, in_features, *kernel).to(dtype)


@st.composite
def deltas(draw):
    kernel = draw(st.sampled_from(KERNELS))
    out, in_features = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    rank = draw(st.integers(1, 8))
    return low_rank_delta(out, in_features, kernel, rank, draw(st.integers(0, 2**31 - 1))), rank


@PROPERTY
@given(case=deltas())
def test_full_extraction_is_exact_at_the_numerical_rank(case) -> None:
    delta, rank = case
    layer = extract_layer(delta)
    assert layer.weight_shape == tuple(delta.shape)
    assert layer.rank == min(rank, delta.shape[0], delta[0].numel())  # rounding noise is never kept
    assert layer.alpha == layer.rank and layer.scale == 1.0
    assert layer.u.dtype == torch.float32 and is_canonical(layer)
    assert rel_error(reference_delta(layer), delta) < 1e-5
    assert max_orthonormality_error(layer) < 1e-5
    assert kept_energy(layer, delta) == pytest.approx(1.0, abs=1e-5)


@PROPERTY
@given(case=deltas(), cut=st.integers(1, 8))
def test_a_rank_cut_is_the_optimal_one(case, cut: int) -> None:
    delta, _ = case
    layer = extract_layer(delta, rank=cut)
    sigma = torch.linalg.svdvals(delta.double().reshape(delta.shape[0], -1))
    k = layer.rank
    assert k <= cut
    error = torch.linalg.vector_norm((reference_delta(layer) - delta.double()).flatten())
    # Eckart-Young: the error of the best rank-k approximation is the norm of the dropped values.
    assert float(error) == pytest.approx(float(sigma[k:].norm()), abs=1e-4 * float(sigma.norm()))
    torch.testing.assert_close(layer.s.double(), sigma[:k], rtol=1e-5, atol=1e-5 * float(sigma[0]))


def test_energy_keeps_the_fewest_directions_that_reach_it() -> None:
    g = torch.Generator().manual_seed(3)
    u = torch.linalg.qr(torch.randn(30, 4, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(20, 4, generator=g, dtype=torch.float64))[0]
    delta = (u * torch.tensor([4.0, 2.0, 1.0, 0.5], dtype=torch.float64)) @ v.T  # energy 16, 4, 1, 0.25
    total = 21.25
    assert extract_layer(delta, energy=16 / total).rank == 1
    assert extract_layer(delta, energy=16 / total + 1e-9).rank == 2
    assert extract_layer(delta, energy=0.95).rank == 3  # (16 + 4) / 21.25 = 0.941
    assert extract_layer(delta, energy=0.95, rank=2).rank == 2
    assert extract_layer(delta, energy=1.0).rank == 4
    layer = extract_layer(delta, energy=0.9)
    assert layer.u.dtype == torch.float64  # float64 in, float64 out
    assert kept_energy(layer, delta) == pytest.approx(20 / total)


def test_randomized_svd_matches_the_exact_one_for_a_low_rank_delta() -> None:
    delta = low_rank_delta(200, 120, (), rank=5, seed=4)
    exact = extract_layer(delta, rank=3)
    fast = extract_layer(delta, rank=3, method="randomized")
    again = extract_layer(delta, rank=3, method="randomized")
    assert fast.rank == 3
    assert rel_error(reference_delta(fast), reference_delta(exact)) < 1e-4
    assert torch.equal(fast.u, again.u) and torch.equal(fast.s, again.s)  # seeded: same bytes
    full = extract_layer(delta, method="randomized")  # no room for oversampling: exact SVD
    assert rel_error(reference_delta(full), delta) < 1e-5


def test_the_randomized_start_does_not_disturb_the_global_generator() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    extract_layer(low_rank_delta(100, 80, (), rank=4, seed=1), rank=2, method="randomized")
    assert torch.equal(torch.rand(3), expected)


def test_signs_are_fixed_so_the_same_delta_gives_the_same_bytes() -> None:
    delta = low_rank_delta(12, 7, (3, 3), rank=3, seed=8)
    a, b = extract_layer(delta), extract_layer(delta.clone())
    assert torch.equal(a.u, b.u) and torch.equal(a.vt, b.vt)
    negated = extract_layer(-delta)  # the sign goes to Vt: U's largest entries stay positive
    torch.testing.assert_close(negated.u, a.u, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(negated.vt, -a.vt, rtol=1e-5, atol=1e-6)
    idx = a.u.abs().argmax(dim=0)
    assert bool((a.u[idx, torch.arange(a.rank)] > 0).all())
    assert a.vt.shape == (3, 7, 3, 3)


def test_a_zero_delta_gives_nothing_and_half_precision_computes_in_float32() -> None:
    assert extract_layer(torch.zeros(5, 4)) is None
    delta = low_rank_delta(16, 8, (), rank=2, seed=0, dtype=torch.float16)
    layer = extract_layer(delta)
    assert layer.u.dtype == torch.float32 and layer.s.dtype == torch.float32
    assert rel_error(reference_delta(layer), delta) < 1e-5  # exact for the fp16 values as given
    assert extract_layer(delta, rank=2).rank == 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(delta=torch.ones(4)), "extract_layer: delta must be [out, in] or [out, in, *kernel], got shape [4]"),
        (dict(delta=torch.ones(2, 2), method="fast"),
         "extract_layer: method must be one of exact, randomized; got 'fast'"),
        (dict(delta=torch.ones(2, 2), rank=0), "extract_layer: rank must be a positive integer, got 0"),
        (dict(delta=torch.ones(2, 2), rank=True), "extract_layer: rank must be a positive integer, got True"),
        (dict(delta=torch.ones(2, 2), energy=0.0), "extract_layer: energy must be in (0, 1], got 0.0"),
        (dict(delta=torch.ones(2, 2), energy=1.5), "extract_layer: energy must be in (0, 1], got 1.5"),
        (dict(delta=torch.ones(2, 2, dtype=torch.int64)),
         "extract_layer: delta must be a floating-point tensor, got torch.int64"),
        (dict(delta=torch.tensor([[1.0, float("nan")], [0.0, 1.0]])),
         "extract_layer: delta contains NaN or infinite values"),
    ],
)
def test_bad_arguments_are_refused_with_a_clear_message(kwargs, message: str) -> None:
    with pytest.raises(ValueError) as err:
        extract_layer(**kwargs)
    assert str(err.value) == message


def test_energy_rank() -> None:
    s = torch.tensor([3.0, 1.0, 0.1, 0.0])  # energy 9, 1, 0.01, 0
    assert energy_rank(s, 0.9) == 2  # 9 / 10.01 < 0.9
    assert energy_rank(s, 0.899) == 1
    assert energy_rank(s, 1.0) == 3  # exact zeros are dropped, nothing else
    assert energy_rank(s[:2], 0.9999, total=10.01) == 2  # only part of the spectrum: capped
    assert energy_rank(torch.zeros(3), 0.5) == 1
    with pytest.raises(ValueError) as err:
        energy_rank(s, 0.0)
    assert str(err.value) == "energy must be in (0, 1], got 0.0"
