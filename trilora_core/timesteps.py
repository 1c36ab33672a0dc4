"""Which noise levels a training step sees: the timestep sampling of diffusion trainers.

A noise level is t in (0, 1): the fraction of the way from the clean latent (t = 0) to pure
noise (t = 1), before the model's own schedule maps it to a sigma. For a rectified-flow model
that schedule is the model's time shift, sigma = shift * t / (1 + (shift - 1) * t) (SD3 paper,
Esser et al. 2024, eq. 23; ComfyUI's ``time_snr_shift``; Flux's ``exp(mu)`` form is the same
with shift = exp(mu)), so sampling t and shifting it with the model's shift is kohya
sd-scripts' ``--timestep_sampling shift`` and musubi-tuner's ``shift`` at the model's own shift.

- ``uniform``: t ~ U(0, 1), every step of the model's schedule equally often (ComfyUI's
  TrainLoraNode, kohya's SD/SDXL training, kohya's ``sigma`` sampling for flow models).
- ``logit_normal``: t = sigmoid(n), n ~ N(mean, std); SD3's rectified-flow default
  (``logit_normal`` with mean 0, std 1, Esser et al. 2024, section 3.1), kohya's
  ``sigmoid`` / ``shift`` sampling (``--sigmoid_scale`` = std) and ai-toolkit's default for
  flow models. It puts most steps at mid noise, where a flow model's velocity is hardest to
  predict, and few at the two ends.
"""

from __future__ import annotations

import torch

TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")
# t is kept this far off 0 and 1: t = 1 maps to an infinite sigma on eps/v models.
T_MARGIN = 1e-4


def sample_noise_levels(kind: str, n: int, generator: torch.Generator, margin: float = T_MARGIN,
                        mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """``n`` noise levels t drawn with ``kind`` (one of TIMESTEP_SAMPLINGS) from ``generator``.

    Returns a float64 tensor [n] in [margin, 1 - margin]. ``mean`` and ``std`` are the normal's
    for ``logit_normal`` (ignored by ``uniform``). Raises ValueError for an unknown ``kind``,
    a negative ``n``, a margin outside [0, 0.5) or a std that is not positive.
    """
    if kind not in TIMESTEP_SAMPLINGS:
        raise ValueError(f"timestep sampling must be one of {', '.join(TIMESTEP_SAMPLINGS)}, got {kind!r}")
    if n < 0:
        raise ValueError(f"sample_noise_levels: n must not be negative, got {n}")
    if not 0.0 <= margin < 0.5:
        raise ValueError(f"sample_noise_levels: margin must be in [0, 0.5), got {margin}")
    if kind == "uniform":
        return margin + (1 - 2 * margin) * torch.rand(n, generator=generator, dtype=torch.float64)
    if not std > 0:
        raise ValueError(f"sample_noise_levels: std must be positive, got {std}")
    normal = torch.randn(n, generator=generator, dtype=torch.float64) * std + mean
    return torch.sigmoid(normal).clamp(margin, 1 - margin)
