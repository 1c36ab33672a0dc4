"""Loss weighting over noise levels: how much each training sample's error counts, by its noise level.

The trainer takes the error in the model's own prediction space (epsilon, v or flow velocity).
Write the noisy latent as x_t = a * x0 + b * noise (a, b from the model's schedule); the
denoised image is linear in the model's output with factor coeff, so the x0 error is coeff times
the own-space error. Then for one sample at signal-to-noise ratio SNR = (a / b)^2:

- ``none``: weight 1 (the plain loss on the model's own prediction; kohya's and diffusers' default).
- ``min_snr``: weight coeff^2 * min(SNR, gamma): the x0 error weighted by min(SNR, gamma), as in
  Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy" (arXiv 2303.09556).
  For epsilon prediction that is min(1, gamma / SNR) (kohya sd-scripts' ``--min_snr_gamma``:
  min(SNR, gamma) / SNR); for v prediction min(SNR, gamma) / (SNR + 1) (kohya's v-parameterization
  branch). It lowers the weight of the least noisy levels, whose easy, detailed targets otherwise
  dominate the update.
- ``x0``: weight coeff^2: the error of the denoised image (ComfyUI's TrainLoraNode's loss), which
  weighs the noisiest levels, where composition is set, by sigma^2.

Weights are per sample (a [n] tensor), float32, to multiply per-sample losses.
"""

from __future__ import annotations

import torch
from torch import Tensor

LOSS_WEIGHTINGS = ("none", "min_snr", "x0")


def noise_level_weights(kind: str, signal: Tensor, noise: Tensor, coeff: Tensor, gamma: float = 5.0) -> Tensor:
    """Per-sample loss weights [n], float32.

    ``signal``, ``noise``: [n] the factors a and b of x_t = a * x0 + b * noise at each sample's
    noise level (b > 0); ``coeff``: [n] the factor that turns the own-space error into the x0
    error (ComfyUI's ``calculate_denoised`` of a unit output). ``gamma`` > 0 is min-SNR's cap.
    Raises ValueError for an unknown ``kind``, a gamma that is not positive or mismatched shapes.
    """
    if kind not in LOSS_WEIGHTINGS:
        raise ValueError(f"loss_weighting must be one of {', '.join(LOSS_WEIGHTINGS)}, got {kind!r}")
    if not gamma > 0:
        raise ValueError(f"noise_level_weights: gamma must be positive, got {gamma}")
    signal, noise, coeff = (torch.as_tensor(x, dtype=torch.float64).flatten() for x in (signal, noise, coeff))
    if not signal.shape == noise.shape == coeff.shape:
        raise ValueError(f"noise_level_weights: signal, noise and coeff must have one value per sample, got "
                         f"{tuple(signal.shape)}, {tuple(noise.shape)}, {tuple(coeff.shape)}")
    if kind == "none":
        return torch.ones(signal.shape, dtype=torch.float32)
    x0_weight = coeff.square()
    if kind == "x0":
        return x0_weight.float()
    snr = (signal / noise).square()
    return (x0_weight * snr.clamp(max=gamma)).float()
