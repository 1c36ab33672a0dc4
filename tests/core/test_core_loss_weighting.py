"""Loss weighting over noise levels, against the published formulas: min-SNR-gamma as kohya
sd-scripts applies it (library/custom_train_functions.py: apply_snr_weight, with
v_parameterization: min(SNR, gamma) / (SNR + 1)), and the x0 (denoised image) error."""
from __future__ import annotations

import pytest
import torch

from trilora_core import LOSS_WEIGHTINGS, noise_level_weights

SIGMAS = torch.tensor([0.03, 0.3, 1.0, 3.0, 14.6], dtype=torch.float64)  # SD1.5's range of sigma


def eps_model(sigma):
    """ComfyUI's EPS: x_t = x0 + sigma * noise, x0_hat = x_t - sigma * eps_hat."""
    return torch.ones_like(sigma), sigma, -sigma


def v_model(sigma):
    """ComfyUI's V_PREDICTION (sigma_data 1): same x_t; x0_hat = x_t / (sigma^2 + 1) - v_hat * sigma / sqrt(sigma^2 + 1)."""
    return torch.ones_like(sigma), sigma, -sigma / (sigma.square() + 1).sqrt()


def flow_model(sigma):
    """ComfyUI's CONST (rectified flow): x_t = (1 - sigma) x0 + sigma noise, x0_hat = x_t - sigma * v_hat."""
    return 1 - sigma, sigma, -sigma


def test_none_is_one_everywhere():
    w = noise_level_weights("none", *eps_model(SIGMAS))
    assert w.dtype == torch.float32 and torch.equal(w, torch.ones(5))


@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_for_eps_is_kohyas_min_snr_over_snr(gamma):
    snr = 1 / SIGMAS.square()
    want = torch.minimum(snr, torch.full_like(snr, gamma)) / snr
    assert torch.allclose(noise_level_weights("min_snr", *eps_model(SIGMAS), gamma=gamma).double(), want, rtol=1e-6)
    # The least noisy levels lose weight, the noisy ones keep all of it.
    w = noise_level_weights("min_snr", *eps_model(SIGMAS), gamma=gamma)
    assert w[0] < 0.01 and w[-1] == 1.0


def test_min_snr_for_v_is_kohyas_v_parameterization_branch():
    snr = 1 / SIGMAS.square()
    want = torch.minimum(snr, torch.full_like(snr, 5.0)) / (snr + 1)
    assert torch.allclose(noise_level_weights("min_snr", *v_model(SIGMAS)).double(), want, rtol=1e-6)


def test_min_snr_for_flow_weights_the_x0_error_by_min_snr_gamma():
    sigma = torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)
    snr = ((1 - sigma) / sigma).square()
    want = sigma.square() * torch.minimum(snr, torch.full_like(snr, 5.0))
    assert torch.allclose(noise_level_weights("min_snr", *flow_model(sigma)).double(), want, rtol=1e-6)


def test_x0_weighting_turns_the_eps_error_into_the_denoised_images_error():
    signal, noise, coeff = eps_model(SIGMAS)
    eps_err = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x0_err = eps_err * coeff[:, None, None, None]
    w = noise_level_weights("x0", signal, noise, coeff).double()
    per_sample = eps_err.square().mean(dim=(1, 2, 3))
    assert torch.allclose(w * per_sample, x0_err.square().mean(dim=(1, 2, 3)), rtol=1e-6)
    assert torch.allclose(w, SIGMAS.square(), rtol=1e-6)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="loss_weighting must be one of none, min_snr, x0"):
        noise_level_weights("snr", *eps_model(SIGMAS))
    with pytest.raises(ValueError, match="gamma must be positive"):
        noise_level_weights("min_snr", *eps_model(SIGMAS), gamma=0.0)
    with pytest.raises(ValueError, match="one value per sample"):
        noise_level_weights("x0", SIGMAS, SIGMAS, SIGMAS[:2])
    assert LOSS_WEIGHTINGS == ("none", "min_snr", "x0")
