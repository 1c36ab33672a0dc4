"""What a training run is measured by while it trains, with no model: the held-out split, the fixed
noise levels and noise of every evaluation, the errors of one prediction (in the model's own
prediction space and as x0 error), base drift, and which evaluated step to keep (keep_best) and
when to stop early.

Fixed means fixed across evaluations *and* runs: the levels are the midpoints of equal bins of the
noise fraction, and the noise is drawn from VALIDATION_SEED (not the run's seed), so a curve is
smooth and two runs on the same data are scored on the same inputs."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .training import generator

VALIDATION_LEVELS = 4  # noise levels per evaluation
VALIDATION_SEED = 20250  # the noise of every evaluation, the same for every run
KEEP_BEST = ("off", "held-out", "drift-bounded held-out")


def validation_levels(count: int = VALIDATION_LEVELS) -> list[float]:
    """``count`` noise fractions t in (0, 1) (1 = pure noise), the midpoints of equal bins:
    4 -> [0.125, 0.375, 0.625, 0.875]. The trainer turns t into a sigma with the model's own
    schedule, as it does for training's sampled levels."""
    if count < 1:
        raise ValueError(f"validation_levels: count must be at least 1, got {count}")
    return [(i + 0.5) / count for i in range(count)]


def validation_plan(num_items: int, levels: int = VALIDATION_LEVELS) -> list[list[int]]:
    """The level indices each item is scored at: max(num_items, levels) samples in all, sample j
    being item j mod num_items at level j mod levels. One item gets every level; as many items as
    levels one each; more items one level each, the levels taking turns. So an evaluation costs
    about max(items, levels) samples however many items there are, every level is scored, and
    the plan is the same in every evaluation and run."""
    plan: list[list[int]] = [[] for _ in range(num_items)]
    for j in range(max(num_items, levels) if num_items else 0):
        plan[j % num_items].append(j % levels)
    return [sorted(set(p)) for p in plan]


def validation_noise(shape, purpose: str, item: int, level: int) -> Tensor:
    """Standard normal float32 noise of ``shape`` (CPU) for one (purpose, item, level) of an
    evaluation, e.g. ("heldout", image 2, level 0): the same tensor in every evaluation and run."""
    return torch.randn(tuple(shape), generator=generator(VALIDATION_SEED, "validation", purpose, item, level))


def holdout_split(num_images: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(training image indices, held-out image indices), sorted and disjoint, covering 0..n-1.

    round(fraction x n) images are held out (at least 1 when fraction > 0), chosen by a
    permutation drawn from the run's seed. Raises ValueError when no training image would be left
    or the fraction is outside [0, 1)."""
    if not (math.isfinite(fraction) and 0.0 <= fraction < 1.0):
        raise ValueError(f"validation_split must be at least 0 and below 1, got {fraction}")
    held = 0 if fraction == 0 else max(1, round(fraction * num_images))
    if held >= num_images:
        raise ValueError(f"validation_split {fraction} holds out {held} of the {num_images} training images and "
                         "leaves none to train on; lower it or give more images")
    order = torch.randperm(num_images, generator=generator(seed, "holdout")).tolist()
    return sorted(order[held:]), sorted(order[:held])


def prediction_errors(denoised: Tensor, x0: Tensor, coeff: Tensor) -> tuple[Tensor, Tensor]:
    """(objective error, x0 error), each [batch] float32: the mean squared error per sample of the
    model's own prediction (eps, v, flow ...: (denoised - x0) / coeff, coeff being the output's
    coefficient in ComfyUI's calculate_denoised) and of the denoised latent itself."""
    err = denoised.float() - x0.float()
    return (err / coeff.float()).square().flatten(1).mean(1), err.square().flatten(1).mean(1)


def prediction_drift(denoised: Tensor, base_denoised: Tensor, coeff: Tensor) -> tuple[Tensor, Tensor]:
    """(drift, x0 drift), each [batch] float32: the mean squared change per sample of the model's
    own prediction and of the denoised latent against the base model's on the same input."""
    return prediction_errors(denoised, base_denoised, coeff)


@dataclass
class BestStep:
    """keep_best and early stopping over a run's evaluations (``update`` once per evaluation).

    mode: one of KEEP_BEST. 'held-out' keeps the evaluated step with the lowest held-out error;
    'drift-bounded held-out' the lowest among those whose drift is at most ``max_drift``.
    patience: stop after this many evaluations in a row without a new best (0 = never)."""

    mode: str = "off"
    max_drift: float = math.inf
    patience: int = 0
    step: int | None = None  # the chosen step, None until one qualifies
    value: float = math.inf
    since: int = 0  # evaluations since the last new best
    history: list = field(default_factory=list)

    def __post_init__(self):
        if self.mode not in KEEP_BEST:
            raise ValueError(f"keep_best must be one of {', '.join(KEEP_BEST)}, got {self.mode!r}")

    def eligible(self, heldout: float | None, drift: float | None) -> bool:
        if self.mode == "off" or heldout is None or not math.isfinite(heldout):
            return False
        if self.mode == "drift-bounded held-out":
            return drift is not None and drift <= self.max_drift
        return True

    def update(self, step: int, heldout: float | None, drift: float | None) -> bool:
        """Records one evaluation; True when ``step`` is the new best."""
        self.history.append((step, heldout, drift))
        if self.eligible(heldout, drift) and heldout < self.value:
            self.step, self.value, self.since = step, heldout, 0
            return True
        self.since += 1
        return False

    @property
    def stop(self) -> bool:
        """Early stop: ``patience`` evaluations without a new best (only while keeping the best)."""
        return self.mode != "off" and self.patience > 0 and self.since >= self.patience
