"""TrainTriLoRA's training-only mechanisms on s in the real ComfyUI: T-LoRA's noise-level-dependent
rank (timestep_min_rank) and AdaLoRA's rank budget (rank_budget).

Step 1 starts at s = 0, where only s has a gradient (U's and V's are proportional to s), and a
direction that no sample of the step used gets none: so after one step exactly the directions the
mask let through are non-zero. That holds with gradient checkpointing too only if the mask is
also in place when the backward recomputes the forward."""
from __future__ import annotations

import pytest
import torch
from test_train import load_data, train

RANK = 4


@pytest.fixture(scope="module")
def data(comfy_host):
    return load_data(comfy_host)


def first_levels(comfy_host, seed: int, n: int) -> list[float]:
    """The noise levels (1 the noisiest) of step 1's batch of n, as the trainer draws them."""
    core = comfy_host.core
    return [float(t) for t in core.timesteps.sample_noise_levels("uniform", n, core.generator(seed, "noise", 0, 0))]


def used(layer) -> int:
    """Directions of a saved (canonical: re-decomposed) layer above rounding."""
    return int((layer.s.abs() > 1e-5 * layer.s.abs().max().clamp_min(1e-30)).sum())


def nonzero_directions(trilora) -> set[int]:
    return {used(layer) for layer in trilora.layers.values()}


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize(("seed", "batch"), [(3, 1), (4, 1), (3, 2)])
def test_timestep_min_rank_trains_only_the_directions_of_the_steps_noise_levels(comfy_host, data, checkpointing,
                                                                               seed, batch):
    core = comfy_host.core
    levels = first_levels(comfy_host, seed, batch)
    want = max(core.active_directions(t, RANK, 1) for t in levels)
    assert 1 <= want < RANK  # the seeds pick levels where the mask shows
    _, trilora, _, _ = train(comfy_host, data, steps=1, rank=RANK, seed=seed, batch_size=batch,
                             timestep_min_rank=1, gradient_checkpointing=checkpointing)
    assert nonzero_directions(trilora) == {want}
    _, plain, _, _ = train(comfy_host, data, steps=1, rank=RANK, seed=seed, batch_size=batch,
                           gradient_checkpointing=checkpointing)
    assert nonzero_directions(plain) == {RANK}


def test_rank_budget_keeps_the_share_of_directions_over_all_layers(comfy_host, data):
    _, trilora, loss_map, _ = train(comfy_host, data, steps=20, rank=RANK, seed=0, rank_budget=0.25)
    total = RANK * len(trilora.layers)
    kept = sum(used(layer) for layer in trilora.layers.values())
    assert kept == total // 4  # the final mask holds after every one of the last 30 % of the steps
    assert len(nonzero_directions(trilora)) > 1  # a budget over all layers, not the same rank in each
    assert all(torch.isfinite(torch.tensor(loss_map["loss"])))
    _, plain, _, _ = train(comfy_host, data, steps=20, rank=RANK, seed=0)
    assert sum(used(layer) for layer in plain.layers.values()) == total


def test_bad_values_are_named(comfy_host, data):
    with pytest.raises(ValueError, match="rank_budget must be above 0 and at most 1"):
        train(comfy_host, data, steps=1, rank_budget=1.5)
    with pytest.raises(ValueError, match="timestep_min_rank must not be negative"):
        train(comfy_host, data, steps=1, timestep_min_rank=-1)
