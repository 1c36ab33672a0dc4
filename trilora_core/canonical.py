"""Canonical SVD form of a TriLoRA layer, rank truncation and the singular spectrum.

Canonical form: U and V (= Vt reshaped and transposed) have orthonormal columns and s is
descending and non-negative, so s are the singular values of U diag(s) Vt and cutting the
tail is the best low-rank approximation (Eckart-Young).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .layer import TriLoRALayer, compute_dtype

# Orthonormality tolerance per storage dtype: canonical factors stored in half precision
# are only orthonormal up to that dtype's rounding.
_DEFAULT_ATOL = {
    torch.float64: 1e-9,
    torch.float32: 1e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 3e-2,
}


def _canonical_factors(layer: TriLoRALayer) -> tuple[Tensor, Tensor, Tensor]:
    """U', sigma, V'^T (flattened) in float32/float64 with U' sigma V'^T == U diag(s) Vt."""
    work = compute_dtype(layer.u.dtype)
    with torch.no_grad():
        u = layer.u.detach().to(work)
        s = layer.s.detach().to(work)
        v = layer.vt.detach().to(work).reshape(layer.rank, -1).T  # [in, r]
        # Reduced QR keeps the cost at O((out + in) r^2): only the r x r core gets an SVD.
        q_u, r_u = torch.linalg.qr(u, mode="reduced")  # [out, ku], [ku, r]
        q_v, r_v = torch.linalg.qr(v, mode="reduced")  # [in, kv], [kv, r]
        core = (r_u * s) @ r_v.T  # [ku, kv]
        p, sigma, qh = torch.linalg.svd(core, full_matrices=False)
        new_u = q_u @ p  # [out, k]
        new_vt = qh @ q_v.T  # [k, in]
        new_u, new_vt = fix_signs(new_u, new_vt)
    return new_u, sigma, new_vt


def fix_signs(u: Tensor, vt: Tensor) -> tuple[Tensor, Tensor]:
    """SVD signs are arbitrary: each U column's largest-magnitude entry made positive (the
    matching row of the flattened Vt [r, in] flipped with it), so the same delta W always gives
    the same bytes on disk."""
    idx = u.abs().argmax(dim=0, keepdim=True)
    signs = torch.sign(torch.gather(u, 0, idx)).squeeze(0)
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return u * signs, vt * signs[:, None]


def canonicalize(layer: TriLoRALayer) -> TriLoRALayer:
    """The same delta W in canonical SVD form, in the dtype and on the device of ``layer.u``.

    When out or in is below the rank, the rank drops to k = min(r, out, in) and alpha becomes
    alpha * k / r, so alpha / rank (and delta W) stay the same.
    """
    new_u, sigma, new_vt = _canonical_factors(layer)
    k = sigma.shape[0]
    dtype = layer.u.dtype
    return TriLoRALayer(
        u=new_u.to(dtype).contiguous(),
        s=sigma.to(dtype).contiguous(),
        vt=new_vt.reshape(k, *layer.vt.shape[1:]).to(dtype).contiguous(),
        alpha=layer.alpha * k / layer.rank,
    )


def is_canonical(layer: TriLoRALayer, atol: float | None = None) -> bool:
    """Whether U and V are orthonormal (within ``atol``) and s is descending and >= 0.

    ``atol`` defaults to a bound that suits the storage dtype (1e-4 for float32, 1e-2 for
    float16, 3e-2 for bfloat16).
    """
    if atol is None:
        atol = _DEFAULT_ATOL.get(layer.u.dtype, 1e-4)
    r = layer.rank
    if r > layer.out_features or r > math.prod(layer.weight_shape[1:]):
        return False  # more columns than rows cannot be orthonormal
    work = compute_dtype(layer.u.dtype)
    with torch.no_grad():
        s = layer.s.detach().to(work)
        if bool((s < 0).any()) or bool((s[1:] > s[:-1]).any()):
            return False
        eye = torch.eye(r, dtype=work, device=layer.u.device)
        u = layer.u.detach().to(work)
        v = layer.vt.detach().to(work).reshape(r, -1)
        for gram in (u.T @ u, v @ v.T):
            if not bool(((gram - eye).abs() <= atol).all()):
                return False
    return True


def truncate(layer: TriLoRALayer, rank: int | None = None, energy: float | None = None) -> TriLoRALayer:
    """Keep the top-k singular triplets of ``layer`` (canonicalized first when needed).

    k = min(rank, r) when ``rank`` is given; with ``energy`` (0 < energy <= 1) k is the
    smallest count whose share of sum(s^2) reaches ``energy``; with both, the smaller k; with
    neither, ``layer`` is returned unchanged. At least one triplet is kept. alpha becomes
    alpha * k / r so the kept part of delta W is unchanged; the Frobenius error is
    (alpha / r) * sqrt(sum of the dropped s^2).
    """
    if rank is None and energy is None:
        return layer
    if rank is not None and (isinstance(rank, bool) or int(rank) != rank or rank < 1):
        raise ValueError(f"truncate: rank must be a positive integer, got {rank!r}")
    if energy is not None and not (0.0 < energy <= 1.0):
        raise ValueError(f"truncate: energy must be in (0, 1], got {energy!r}")
    if not is_canonical(layer):
        layer = canonicalize(layer)
    r = layer.rank
    k = r
    if rank is not None:
        k = min(k, int(rank))
    if energy is not None:
        # float64 cumulative sum; the last entry is the total, so energy == 1 reaches it exactly.
        cumulative = torch.cumsum(layer.s.detach().to(torch.float64) ** 2, dim=0)
        total = cumulative[-1]
        if total > 0:
            reached = (cumulative / total >= energy).nonzero()
            k = min(k, int(reached[0, 0]) + 1)
        else:
            k = 1
    k = max(k, 1)
    if k == r:
        return layer
    return TriLoRALayer(
        u=layer.u[:, :k].contiguous(),
        s=layer.s[:k].contiguous(),
        vt=layer.vt[:k].contiguous(),
        alpha=layer.alpha * k / r,
    )


def spectrum(layer: TriLoRALayer) -> Tensor:
    """Singular values of delta W (descending float32), i.e. canonical s times alpha / r."""
    _, sigma, _ = _canonical_factors(layer)
    return (sigma * layer.scale).to(torch.float32)


def truncation_limits(max_rank: int, energy: float) -> dict[str, int | float | None]:
    """``truncate``'s keyword arguments from the nodes' inputs, where max_rank 0 means no limit
    and energy 1.0 keeps every direction (not "the fewest holding 100%", which drops exact zeros)."""
    return {"rank": max_rank or None, "energy": energy if energy < 1.0 else None}


def delta_energy(layer: TriLoRALayer) -> float:
    """||delta W||_F^2 from the singular values (cheap: no full-size delta is formed), float64."""
    return float((spectrum(layer).double() ** 2).sum())
