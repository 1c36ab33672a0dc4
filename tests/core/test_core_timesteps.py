"""Timestep sampling: the distributions diffusion trainers draw noise levels from."""
from __future__ import annotations

import math

import pytest
import torch

from trilora_core.timesteps import T_MARGIN, TIMESTEP_SAMPLINGS, sample_noise_levels

N = 200_000


def _draw(kind: str, seed: int = 0, n: int = N, **kw) -> torch.Tensor:
    return sample_noise_levels(kind, n, torch.Generator().manual_seed(seed), **kw)


def _normal_cdf(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


@pytest.mark.parametrize("kind", TIMESTEP_SAMPLINGS)
def test_levels_are_float64_inside_the_margins_and_seeded(kind):
    t = _draw(kind)
    assert t.dtype == torch.float64 and t.shape == (N,)
    assert float(t.min()) >= T_MARGIN and float(t.max()) <= 1 - T_MARGIN
    assert torch.equal(t, _draw(kind)) and not torch.equal(t, _draw(kind, seed=1))


def test_uniform_covers_the_schedule_evenly():
    t = _draw("uniform")
    # Each tenth of (0, 1) gets a tenth of the draws (binomial sd ~ 0.0007).
    counts = torch.histc(t.float(), bins=10, min=0, max=1) / N
    assert torch.allclose(counts, torch.full((10,), 0.1), atol=0.005)


@pytest.mark.parametrize(("mean", "std"), [(0.0, 1.0), (0.5, 0.8)])
def test_logit_normal_is_the_sigmoid_of_a_normal(mean, std):
    t = _draw("logit_normal", mean=mean, std=std)
    logits = torch.log(t / (1 - t))
    assert abs(float(logits.mean()) - mean) < 0.01
    assert abs(float(logits.std()) - std) < 0.01
    # Its CDF at a few points is the normal's at the logit (SD3 paper's density, section 3.1).
    for x in (0.1, 0.3, 0.5, 0.7, 0.9):
        expected = _normal_cdf((math.log(x / (1 - x)) - mean) / std)
        assert abs(float((t <= x).double().mean()) - expected) < 0.005


def test_logit_normal_puts_fewer_steps_at_the_ends_than_uniform():
    ends = {kind: float(((_draw(kind) < 0.1) | (_draw(kind) > 0.9)).double().mean()) for kind in TIMESTEP_SAMPLINGS}
    assert abs(ends["uniform"] - 0.2) < 0.01
    assert abs(ends["logit_normal"] - 2 * _normal_cdf(math.log(0.1 / 0.9))) < 0.01  # about 0.028


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(kind="sigma"), "must be one of uniform, logit_normal"),
    (dict(n=-1), "n must not be negative"),
    (dict(margin=0.5), "margin must be in"),
    (dict(std=0.0), "std must be positive"),
])
def test_bad_arguments_are_named(kwargs, message):
    args = dict(kind="logit_normal", n=4, margin=T_MARGIN, std=1.0) | kwargs
    with pytest.raises(ValueError, match=message):
        sample_noise_levels(args.pop("kind"), args.pop("n"), torch.Generator(), **args)
