"""A TriLoRA layer from a full weight difference (fine-tuned minus base), by truncated SVD.

By Eckart-Young the top-k singular triplets of delta W are the best rank-k approximation of it
in Frobenius (and spectral) norm, so the extracted layer is the optimal one of its rank. It is
returned in canonical form with alpha = rank (scale 1): s holds the singular values of delta W.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .canonical import fix_signs
from .layer import TriLoRALayer, compute_dtype

SVD_METHODS = ("exact", "randomized")
# Extra columns and power iterations of the randomized SVD (Halko et al.): with 10 extra
# columns and 4 iterations the top singular values of weight differences are accurate to
# well below a percent.
RANDOMIZED_OVERSAMPLE = 10
RANDOMIZED_NITER = 4


def energy_rank(singular_values: Tensor, energy: float, total: float | Tensor | None = None) -> int:
    """The fewest leading singular values whose share of the energy reaches ``energy``.

    Energy is sum(s^2); ``total`` is the whole energy when ``singular_values`` holds only the
    leading part of a spectrum (then the count is capped at their number). At least 1.
    """
    if not (0.0 < energy <= 1.0):
        raise ValueError(f"energy must be in (0, 1], got {energy!r}")
    s2 = singular_values.detach().to(torch.float64) ** 2
    if s2.numel() == 0:
        return 1
    cumulative = torch.cumsum(s2, dim=0)
    total = float(cumulative[-1]) if total is None else float(total)
    if total <= 0:
        return 1
    if energy == 1.0 and total == float(cumulative[-1]):
        return max(1, int((s2 > 0).sum()))  # all but exact zeros: rounding must never cut one
    reached = (cumulative >= energy * total).nonzero()
    return int(reached[0, 0]) + 1 if reached.numel() else s2.numel()


def _randomized_svd(flat: Tensor, q: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-q singular triplets by torch.svd_lowrank, with its random start drawn from ``seed``."""
    device = flat.device
    devices = [] if device.type == "cpu" else [device.index or 0]
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(flat, q=q, niter=RANDOMIZED_NITER)
    return u, s, v.T


def extract_layer(
    delta: Tensor,
    rank: int | None = None,
    energy: float | None = None,
    method: str = "exact",
    seed: int = 0,
) -> TriLoRALayer | None:
    """The canonical TriLoRA layer closest to ``delta`` with at most ``rank`` directions.

    ``delta`` is [out, in] or [out, in, *kernel] (flattened to out x in*kernel). k is
    min(rank, out, in*kernel), lowered to the fewest directions holding ``energy`` of
    ||delta||_F^2 when ``energy`` < 1; neither given keeps the full rank (exact). ``method``
    "exact" runs torch.linalg.svd, "randomized" torch.svd_lowrank (faster for a small rank,
    approximate). Returns None when ``delta`` is zero. Factors are float32 (float64 for a
    float64 delta) on ``delta``'s device; alpha = k, so s are delta's singular values.
    """
    if method not in SVD_METHODS:
        raise ValueError(f"extract_layer: method must be one of {', '.join(SVD_METHODS)}; got {method!r}")
    if delta.ndim < 2 or delta.ndim > 5:
        raise ValueError(f"extract_layer: delta must be [out, in] or [out, in, *kernel], got shape {list(delta.shape)}")
    if rank is not None and (isinstance(rank, bool) or int(rank) != rank or rank < 1):
        raise ValueError(f"extract_layer: rank must be a positive integer, got {rank!r}")
    if energy is not None and not (0.0 < energy <= 1.0):
        raise ValueError(f"extract_layer: energy must be in (0, 1], got {energy!r}")
    if not delta.is_floating_point():
        raise ValueError(f"extract_layer: delta must be a floating-point tensor, got {delta.dtype}")
    work = compute_dtype(delta.dtype)
    with torch.no_grad():
        flat = delta.detach().to(work).reshape(delta.shape[0], -1)
        if not bool(torch.isfinite(flat).all()):
            raise ValueError("extract_layer: delta contains NaN or infinite values")
        total = float(torch.linalg.vector_norm(flat.to(torch.float64)) ** 2)
        if total == 0.0:
            return None
        full = min(flat.shape)
        cap = full if rank is None else min(int(rank), full)
        if method == "randomized" and cap + RANDOMIZED_OVERSAMPLE < full:
            u, s, vt = _randomized_svd(flat, cap + RANDOMIZED_OVERSAMPLE, seed)
        else:
            u, s, vt = torch.linalg.svd(flat, full_matrices=False)
        # Directions below the numerical rank are rounding noise of an SVD of a low-rank delta
        # (numpy's matrix_rank tolerance): they are never kept.
        tolerance = float(s[0]) * max(flat.shape) * torch.finfo(work).eps
        k = min(cap, max(1, int((s[:cap] > tolerance).sum())))
        if energy is not None and energy < 1.0:
            k = min(k, energy_rank(s[:cap], energy, total=total))
        u, vt = fix_signs(u[:, :k], vt[:k])
        s = s[:k].clamp_min(0)
    return TriLoRALayer(
        u=u.contiguous(),
        s=s.contiguous(),
        vt=vt.reshape(k, *delta.shape[1:]).contiguous(),
        alpha=float(k),
    )


def kept_energy(layer: TriLoRALayer, delta: Tensor) -> float:
    """Share of ||delta||_F^2 that ``layer`` (an extraction of ``delta``) reproduces."""
    total = float(torch.linalg.vector_norm(delta.detach().to(torch.float64)) ** 2)
    if total == 0.0:
        return 1.0
    kept = float(((layer.s.detach().to(torch.float64) * layer.scale) ** 2).sum())
    return min(1.0, kept / total) if math.isfinite(kept) else 0.0
