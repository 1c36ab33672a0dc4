"""trilora_core.validation: the fixed levels and noise, the held-out split, the error and drift of a
prediction, and keep_best / early stopping."""
from __future__ import annotations

import math

import pytest
import torch

from trilora_core import (
    VALIDATION_LEVELS,
    BestStep,
    holdout_split,
    prediction_drift,
    prediction_errors,
    validation_levels,
    validation_noise,
    validation_plan,
)


def test_levels_are_bin_midpoints_and_noise_is_the_same_every_call():
    assert validation_levels(4) == [0.125, 0.375, 0.625, 0.875]
    assert len(validation_levels()) == VALIDATION_LEVELS
    a = validation_noise((1, 4, 8, 8), "heldout", 2, 1)
    assert torch.equal(a, validation_noise((1, 4, 8, 8), "heldout", 2, 1))
    assert a.dtype == torch.float32 and abs(float(a.std()) - 1) < 0.2
    for other in (("heldout", 2, 0), ("heldout", 3, 1), ("drift", 2, 1)):
        assert not torch.equal(a, validation_noise((1, 4, 8, 8), *other))
    with pytest.raises(ValueError):
        validation_levels(0)


def test_plan_scores_every_level_in_about_max_items_levels_samples():
    assert validation_plan(1) == [[0, 1, 2, 3]]
    assert validation_plan(2) == [[0, 2], [1, 3]]
    assert validation_plan(4) == [[0], [1], [2], [3]]
    assert validation_plan(6) == [[0], [1], [2], [3], [0], [1]]
    assert validation_plan(0) == []
    for n in range(1, 12):
        plan = validation_plan(n)
        assert sum(map(len, plan)) == max(n, VALIDATION_LEVELS) and {lv for p in plan for lv in p} == {0, 1, 2, 3}


@pytest.mark.parametrize("n, fraction, held", [(4, 0.25, 1), (10, 0.2, 2), (3, 0.01, 1), (5, 0.0, 0), (7, 0.5, 4)])
def test_split_is_disjoint_complete_seeded_and_sized(n, fraction, held):
    keep, out = holdout_split(n, fraction, seed=5)
    assert len(out) == held and sorted(keep + out) == list(range(n)) and not set(keep) & set(out)
    assert (keep, out) == holdout_split(n, fraction, seed=5)
    if 0 < held < n - 1:
        assert any(holdout_split(n, fraction, seed=s)[1] != out for s in range(6, 20))


@pytest.mark.parametrize("n, fraction", [(1, 0.5), (2, 0.9), (4, 1.0), (4, -0.1), (4, math.nan)])
def test_split_leaving_no_training_image_or_out_of_range_is_an_error(n, fraction):
    with pytest.raises(ValueError, match="validation_split"):
        holdout_split(n, fraction, seed=0)


def test_errors_and_drift_per_sample_in_prediction_and_x0_space():
    x0 = torch.zeros(2, 3, 2, 2)
    denoised = torch.stack([torch.full((3, 2, 2), 1.0), torch.full((3, 2, 2), 2.0)])
    coeff = torch.tensor([0.5, 2.0]).view(2, 1, 1, 1)
    objective, x0_err = prediction_errors(denoised, x0, coeff)
    assert objective.tolist() == [4.0, 1.0] and x0_err.tolist() == [1.0, 4.0]
    drift, drift_x0 = prediction_drift(denoised, denoised.clone(), coeff)
    assert drift.tolist() == [0.0, 0.0] and drift_x0.tolist() == [0.0, 0.0]


def test_best_step_held_out_drift_bound_and_patience():
    best = BestStep("held-out", patience=2)
    assert [best.update(s, h, d) for s, h, d in [(0, 1.0, 0.0), (10, 0.8, 0.5), (20, 0.9, 0.1)]] == [True, True, False]
    assert best.step == 10 and not best.stop
    best.update(30, 0.85, 0.1)
    assert best.stop and best.step == 10
    bounded = BestStep("drift-bounded held-out", max_drift=0.2)
    for s, h, d in [(0, 1.0, 0.0), (10, 0.5, 0.3), (20, 0.7, 0.2), (30, 0.6, None)]:
        bounded.update(s, h, d)
    assert bounded.step == 20
    off = BestStep("off", patience=1)
    off.update(0, 1.0, 0.0)
    off.update(1, 2.0, 0.0)
    assert off.step is None and not off.stop
    with pytest.raises(ValueError, match="keep_best"):
        BestStep("lowest")
