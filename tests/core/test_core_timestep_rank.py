"""T-LoRA's timestep-dependent rank, against the published schedule
r(t) = floor(((T - t) / T) ** power * (R - R_min)) + R_min (arXiv 2507.05964; LyCORIS tlora, as
SimpleTuner documents it: rank 64, min 1, T = 1000 gives 64, 48, 32, 16, 1 at t = 0, 250, 500,
750, 999)."""
from __future__ import annotations

import math

import pytest
import torch

from trilora_core import (
    TIMESTEP_RANK_KEY,
    TriLoRALayer,
    active_directions,
    band_starts,
    banded,
    nested_bands,
    rank_mask,
    read_schedule,
    read_trilora,
    schedule_metadata,
    write_trilora,
)
from trilora_core.canonical import canonicalize, is_canonical


def test_the_published_linear_schedule():
    got = [active_directions(t / 1000, 64, 1) for t in (0, 250, 500, 750, 999)]
    assert got == [64, 48, 32, 16, 1]


def test_the_published_quadratic_and_square_root_schedules():
    assert [active_directions(t / 1000, 64, 1, 2.0) for t in (0, 250, 500, 750, 999)] == [64, 36, 16, 4, 1]
    # SimpleTuner's page gives 55, 46, 33 for power 0.5 from (1 - t)^0.5 * 63 + 1: 55.6, 45.5, 32.5
    assert [active_directions(t / 1000, 64, 1, 0.5) for t in (0, 250, 500, 750, 999)] == [64, 55, 45, 32, 2]


def test_every_direction_at_the_least_noise_and_min_rank_at_the_most():
    for rank in (1, 4, 16):
        for low in (0, 1, 2):
            assert active_directions(0.0, rank, low) == rank
            assert active_directions(1.0, rank, low) == min(low, rank)


def test_the_mask_keeps_the_head_of_s_per_sample():
    levels = torch.tensor([0.0, 0.5, 1.0, 0.9])
    m = rank_mask(levels, 4, 1)
    assert m.dtype == torch.float32 and m.shape == (4, 4)
    assert m.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0]]
    # fewer active directions never at a less noisy level
    fine = rank_mask(torch.linspace(0, 1, 101), 16, 1).sum(1)
    assert torch.all(fine[1:] <= fine[:-1])


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="noise level must be in"):
        active_directions(1.5, 4, 1)
    with pytest.raises(ValueError, match="rank >= 1"):
        active_directions(0.5, 0, 1)
    with pytest.raises(ValueError, match="power > 0"):
        active_directions(0.5, 4, 1, 0.0)


@pytest.mark.parametrize(("rank", "low", "power"), [(4, 1, 1.0), (16, 1, 1.0), (64, 1, 1.0), (8, 0, 1.0),
                                                     (8, 3, 2.0), (32, 2, 0.5), (4, 4, 1.0), (5, 9, 1.0)])
def test_band_starts_reproduce_the_mask_at_every_sampling_percent(rank, low, power):
    starts = band_starts(rank, low, power)
    assert starts[0][1] == 0.0 and starts[-1][0] == rank
    assert all(a[0] < b[0] and a[1] < b[1] for a, b in zip(starts, starts[1:], strict=False))
    percents = sorted({i / 4096 for i in range(4097)} | {p for _, p in starts}
                      | {math.nextafter(p, -1.0) for _, p in starts if p > 0})
    for p in percents:
        by_bands = [k for k, start in starts if start <= p][-1]
        assert by_bands == active_directions(1.0 - p, rank, low, power), p


def test_nested_bands_keep_every_masked_prefix_and_are_canonical_within_a_band():
    g = torch.Generator().manual_seed(0)
    r = 8
    # training's factors: neither orthonormal nor sorted
    u = torch.randn(24, r, generator=g, dtype=torch.float64) + 0.5 * torch.randn(24, 1, generator=g,
                                                                                 dtype=torch.float64)
    vt = torch.randn(r, 6, 3, 3, generator=g, dtype=torch.float64)
    layer = TriLoRALayer(u=u, s=torch.rand(r, generator=g, dtype=torch.float64), vt=vt, alpha=4.0)
    bounds = [k for k, _ in band_starts(r, 1)]
    nested = nested_bands(layer, bounds)
    glob = canonicalize(layer)

    def prefix(x, k):
        return (x.u[:, :k] * x.s[:k]) @ x.vt[:k].flatten(1)

    worst_global = 0.0
    for k in bounds:
        want = prefix(layer, k)
        assert torch.allclose(prefix(nested, k), want, atol=1e-10)
        worst_global = max(worst_global, float((prefix(glob, k) - want).norm() / want.norm()))
    assert worst_global > 0.05  # why the bands are kept apart: the global SVD mixes them
    assert nested.alpha == layer.alpha and nested.rank == r and nested.vt.shape == vt.shape
    for a, b in zip([0, *bounds], bounds, strict=False):
        block = TriLoRALayer(u=nested.u[:, a:b], s=nested.s[a:b], vt=nested.vt[a:b], alpha=float(b - a))
        assert is_canonical(block, atol=1e-9)


def test_nested_bands_keep_a_band_wider_than_the_layer():
    layer = TriLoRALayer(u=torch.randn(2, 4), s=torch.ones(4), vt=torch.randn(4, 3), alpha=4.0)
    nested = nested_bands(layer, [1, 4])
    assert nested.rank == 4
    assert torch.allclose((nested.u * nested.s) @ nested.vt, (layer.u * layer.s) @ layer.vt, atol=1e-5)


def test_band_bounds_are_checked():
    layer = TriLoRALayer(u=torch.randn(5, 4), s=torch.ones(4), vt=torch.randn(4, 3), alpha=4.0)
    for bad in ([], [2, 3], [2, 2, 4], [0, 4]):
        with pytest.raises(ValueError, match="band bounds must ascend"):
            nested_bands(layer, bad)


def test_the_schedule_round_trips_through_metadata_and_bad_entries_are_named():
    assert schedule_metadata(0) == {}
    assert read_schedule(schedule_metadata(2, 0.5)) == (2, 0.5)
    assert read_schedule({}) is None and read_schedule(None) is None
    for bad in ("x", "{}", '{"min_rank": 0, "power": 1}', '{"min_rank": 1, "power": 0}', "[1]"):
        with pytest.raises(ValueError, match=TIMESTEP_RANK_KEY):
            read_schedule({TIMESTEP_RANK_KEY: bad})


def test_a_banded_file_round_trips_and_keeps_its_prefixes(tmp_path):
    g = torch.Generator().manual_seed(1)
    layer = TriLoRALayer(u=torch.randn(16, 6, generator=g), s=torch.rand(6, generator=g),
                         vt=torch.randn(6, 9, generator=g), alpha=3.0)
    path = str(tmp_path / "banded.safetensors")
    write_trilora(path, {"lora_unet_x": layer}, schedule_metadata(1))
    got = read_trilora(path).layers["lora_unet_x"]
    for k in range(1, 7):
        torch.testing.assert_close((got.u[:, :k] * got.s[:k]) @ got.vt[:k],
                                   (layer.u[:, :k] * layer.s[:k]) @ layer.vt[:k], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.s, banded(layer, 1).s)
    assert not is_canonical(got)  # per band, not globally: s is not sorted across the bands here
