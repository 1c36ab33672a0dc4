from __future__ import annotations

import math

import pytest
import torch
from core_helpers import (
    DELTA_RTOL,
    PROPERTY,
    STORAGE_DTYPES,
    delta_tolerance,
    in_features_flat,
    layers,
    max_orthonormality_error,
    random_layer,
    reference_delta,
    rel_error,
)
from hypothesis import given
from hypothesis import strategies as st

from trilora_core import TriLoRALayer, canonicalize, is_canonical, spectrum, truncate

# Orthonormality reachable when canonical factors are stored in each dtype.
ORTHO_ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@PROPERTY
@given(layer=layers())
def test_canonicalize_keeps_delta_and_gives_svd_form(layer: TriLoRALayer) -> None:
    canon = canonicalize(layer)
    k = min(layer.rank, layer.out_features, in_features_flat(layer))
    assert canon.rank == k
    assert canon.weight_shape == layer.weight_shape
    assert canon.vt.shape[1:] == layer.vt.shape[1:]
    assert canon.u.dtype == canon.s.dtype == canon.vt.dtype == layer.u.dtype
    assert math.isclose(canon.alpha, layer.alpha * k / layer.rank)
    assert math.isclose(canon.scale, layer.scale)
    # Reference: the input's delta from its stored values, in float64.
    assert rel_error(reference_delta(canon), reference_delta(layer)) < delta_tolerance(layer)
    assert max_orthonormality_error(canon) < ORTHO_ATOL[layer.u.dtype]
    s = canon.s.to(torch.float64)
    assert bool((s >= 0).all())
    assert bool((s[1:] <= s[:-1]).all())
    assert is_canonical(canon)


@PROPERTY
@given(layer=layers(dtypes=(torch.float32, torch.float64)))
def test_canonicalize_twice_is_stable(layer: TriLoRALayer) -> None:
    once = canonicalize(layer)
    twice = canonicalize(once)
    assert rel_error(reference_delta(twice), reference_delta(once)) < DELTA_RTOL[layer.u.dtype]
    assert rel_error(twice.s, once.s) < DELTA_RTOL[layer.u.dtype]


def test_canonicalize_fixes_signs_deterministically() -> None:
    layer = random_layer(out=9, in_features=5, kernel=(), rank=4, seed=11)
    a, b = canonicalize(layer), canonicalize(layer)
    assert torch.equal(a.u, b.u) and torch.equal(a.vt, b.vt)
    # Each U column's largest-magnitude entry is positive.
    idx = a.u.abs().argmax(dim=0)
    assert bool((a.u[idx, torch.arange(a.rank)] > 0).all())


def test_canonicalize_zero_layer() -> None:
    layer = random_layer(out=5, in_features=4, kernel=(), rank=3, seed=12, zero_tail=3)
    canon = canonicalize(layer)
    assert torch.count_nonzero(canon.delta()) == 0
    assert torch.equal(canon.s, torch.zeros(3))
    assert max_orthonormality_error(canon) < 1e-5


def test_canonicalize_out_and_in_below_rank() -> None:
    layer = random_layer(out=2, in_features=3, kernel=(), rank=6, seed=13, alpha=12.0)
    canon = canonicalize(layer)
    assert canon.rank == 2
    assert canon.alpha == 4.0  # 12 * 2 / 6: alpha / rank unchanged
    assert rel_error(reference_delta(canon), reference_delta(layer)) < 1e-5


def test_canonicalize_keeps_device_and_ignores_grad() -> None:
    layer = random_layer(out=4, in_features=3, kernel=(), rank=2, seed=14)
    layer.u.requires_grad_(True)
    canon = canonicalize(layer)
    assert not canon.u.requires_grad
    assert canon.u.device == layer.u.device


@pytest.mark.parametrize("dtype", STORAGE_DTYPES)
def test_is_canonical(dtype: torch.dtype) -> None:
    layer = random_layer(out=8, in_features=6, kernel=(), rank=4, seed=15, dtype=dtype)
    assert not is_canonical(layer)
    canon = canonicalize(layer)
    assert is_canonical(canon)
    flipped = TriLoRALayer(u=canon.u.flip(1), s=canon.s.flip(0), vt=canon.vt.flip(0), alpha=canon.alpha)
    assert not is_canonical(flipped)  # ascending s
    negative = TriLoRALayer(u=canon.u, s=-canon.s, vt=canon.vt, alpha=canon.alpha)
    assert not is_canonical(negative)
    # Wide U (rank above out) can never have orthonormal columns.
    assert not is_canonical(random_layer(out=2, in_features=6, kernel=(), rank=4, seed=16))


def test_is_canonical_atol() -> None:
    canon = canonicalize(random_layer(out=8, in_features=6, kernel=(), rank=4, seed=17))
    nudged = TriLoRALayer(u=canon.u * 1.001, s=canon.s, vt=canon.vt, alpha=canon.alpha)
    assert not is_canonical(nudged)
    assert is_canonical(nudged, atol=1e-2)


@PROPERTY
@given(layer=layers(dtypes=(torch.float32, torch.float64)), keep=st.integers(1, 12))
def test_truncation_error_is_dropped_singular_values(layer: TriLoRALayer, keep: int) -> None:
    canon = canonicalize(layer)
    cut = truncate(canon, rank=keep)
    k = min(keep, canon.rank)
    assert cut.rank == k
    assert math.isclose(cut.alpha, canon.alpha * k / canon.rank)
    assert math.isclose(cut.scale, canon.scale)
    error = torch.linalg.vector_norm((reference_delta(canon) - reference_delta(cut)).flatten()).item()
    expected = canon.scale * torch.linalg.vector_norm(canon.s[k:].to(torch.float64)).item()
    scale = torch.linalg.vector_norm(reference_delta(canon).flatten()).item()
    assert abs(error - expected) <= 1e-4 * scale + 1e-12


@PROPERTY
@given(
    layer=layers(dtypes=(torch.float32, torch.float64)),
    energy=st.floats(0.01, 1.0, allow_nan=False),
)
def test_energy_truncation_picks_minimal_k(layer: TriLoRALayer, energy: float) -> None:
    canon = canonicalize(layer)
    cut = truncate(canon, energy=energy)
    k = cut.rank
    power = canon.s.to(torch.float64) ** 2
    total = power.sum().item()
    assert 1 <= k <= canon.rank
    if total > 0:
        assert power[:k].sum().item() / total >= energy - 1e-12
        if k > 1:
            assert power[: k - 1].sum().item() / total < energy
    else:
        assert k == 1


def test_truncate_examples() -> None:
    u = torch.eye(4)
    vt = torch.eye(4, 6)
    layer = TriLoRALayer(u=u, s=torch.tensor([4.0, 2.0, 1.0, 1.0]), vt=vt, alpha=8.0)
    assert is_canonical(layer)
    # energy shares: 16/22, 20/22, 21/22, 1
    assert truncate(layer, energy=0.7).rank == 1
    assert truncate(layer, energy=0.9).rank == 2
    assert truncate(layer, energy=0.95).rank == 3
    assert truncate(layer, energy=1.0).rank == 4
    assert truncate(layer, rank=3, energy=0.7).rank == 1  # both: the smaller k
    assert truncate(layer, rank=1, energy=1.0).rank == 1
    assert truncate(layer, rank=10).rank == 4
    cut = truncate(layer, rank=2)
    assert cut.alpha == 4.0
    assert torch.equal(cut.s, torch.tensor([4.0, 2.0]))
    assert truncate(layer) is layer  # neither given: unchanged
    # A zero layer keeps one triplet.
    zero = TriLoRALayer(u=u, s=torch.zeros(4), vt=vt, alpha=4.0)
    assert truncate(zero, energy=0.5).rank == 1


def test_truncate_canonicalizes_first() -> None:
    layer = random_layer(out=8, in_features=7, kernel=(3, 3), rank=5, seed=18)
    cut = truncate(layer, rank=5)
    assert is_canonical(cut)
    assert rel_error(reference_delta(cut), reference_delta(layer)) < 1e-5


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 0}, "truncate: rank must be a positive integer, got 0"),
        ({"rank": 2.5}, "truncate: rank must be a positive integer, got 2.5"),
        ({"energy": 0.0}, "truncate: energy must be in (0, 1], got 0.0"),
        ({"energy": 1.5}, "truncate: energy must be in (0, 1], got 1.5"),
    ],
)
def test_truncate_invalid(kwargs: dict, message: str) -> None:
    layer = random_layer(out=3, in_features=3, kernel=(), rank=2, seed=19)
    with pytest.raises(ValueError) as err:
        truncate(layer, **kwargs)
    assert str(err.value) == message


@PROPERTY
@given(layer=layers(dtypes=(torch.float32, torch.float64, torch.float16)))
def test_spectrum_is_singular_values_of_delta(layer: TriLoRALayer) -> None:
    values = spectrum(layer)
    assert values.dtype == torch.float32
    flat = reference_delta(layer).reshape(layer.out_features, -1)
    expected = torch.linalg.svdvals(flat)[: values.shape[0]]
    assert torch.allclose(values.to(torch.float64), expected, rtol=1e-4, atol=1e-4 * float(expected.max()) + 1e-9)
