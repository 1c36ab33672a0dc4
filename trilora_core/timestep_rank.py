"""Noise-level-dependent rank during training (T-LoRA's timestep masking): fewer active
directions at the noisiest levels.

T-LoRA (Soboleva et al., "T-LoRA: Single Image Diffusion Model Customization Without
Overfitting", AAAI 2026, arXiv 2507.05964) trains with only the first r(t) rank components
active at timestep t:

    r(t) = floor(((T - t) / T) ** power * (R - R_min)) + R_min

(R the rank, R_min the directions kept at the noisiest level, power 1 a linear schedule: the form
LyCORIS's ``tlora`` and SimpleTuner use). With TriLoRA the mask falls on s: direction i of a
sample is used only where i < r(t). Here t is the noise level as ``sample_noise_levels`` draws it,
in [0, 1], 1 the noisiest (ComfyUI's sampling percent 0).
"""

from __future__ import annotations

import torch
from torch import Tensor


def active_directions(level: float, rank: int, min_rank: int, power: float = 1.0) -> int:
    """r(t) of T-LoRA's schedule: directions active at noise level ``level`` in [0, 1] (1 the
    noisiest). ``min_rank`` is clipped to ``rank``. Raises ValueError on a level outside [0, 1],
    rank < 1, min_rank < 0 or power <= 0."""
    if not 0.0 <= level <= 1.0:
        raise ValueError(f"noise level must be in [0, 1], got {level}")
    if rank < 1 or min_rank < 0 or not power > 0:
        raise ValueError(f"need rank >= 1, min_rank >= 0 and power > 0, got {rank}, {min_rank}, {power}")
    low = min(int(min_rank), int(rank))
    # The small epsilon keeps exact fractions (0.5 * 4 = 2) from rounding down through float error.
    return int((1.0 - level) ** power * (rank - low) + 1e-9) + low


def rank_mask(levels: Tensor, rank: int, min_rank: int, power: float = 1.0) -> Tensor:
    """[n, rank] float32 of 0 and 1: row j keeps the first ``active_directions(levels[j])``
    directions. ``levels``: [n] noise levels in [0, 1]."""
    counts = torch.tensor([active_directions(float(t), rank, min_rank, power) for t in levels.reshape(-1)])
    return (torch.arange(rank)[None, :] < counts[:, None]).to(torch.float32)
