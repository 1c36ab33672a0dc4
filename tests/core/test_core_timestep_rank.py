"""T-LoRA's timestep-dependent rank, against the published schedule
r(t) = floor(((T - t) / T) ** power * (R - R_min)) + R_min (arXiv 2507.05964; LyCORIS tlora, as
SimpleTuner documents it: rank 64, min 1, T = 1000 gives 64, 48, 32, 16, 1 at t = 0, 250, 500,
750, 999)."""
from __future__ import annotations

import pytest
import torch

from trilora_core import active_directions, rank_mask


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
