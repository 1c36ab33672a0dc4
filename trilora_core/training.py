"""Training pieces: seeded initial factors, the orthogonality penalty, learning-rate schedules."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .layer import TriLoRALayer

SCHEDULES = ("constant", "cosine", "linear")


def _random_orthonormal(rows: int, cols: int, generator: torch.Generator) -> Tensor:
    """[rows, cols] with orthonormal columns, drawn on the CPU so a seed means the same
    factors on every device."""
    gaussian = torch.randn(rows, cols, generator=generator, dtype=torch.float32, device="cpu")
    q, r = torch.linalg.qr(gaussian.to(torch.float64), mode="reduced")
    # Fixing the signs of diag(R) makes Q unique (and uniformly distributed).
    signs = torch.sign(torch.diagonal(r))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return q * signs


def init_layer(
    weight_shape: Sequence[int],
    rank: int,
    generator: torch.Generator,
    alpha: float | None = None,
    s_init: float = 0.0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> TriLoRALayer:
    """A fresh layer for a weight of ``weight_shape``: random orthonormal U and V, s = s_init.

    s_init = 0 (the default) makes delta W zero, so training starts from the unchanged model.
    ``generator`` must be a CPU generator. The rank is clipped to min(out, in); alpha
    (default: the rank asked for) is scaled with it so alpha / rank stays as asked.
    """
    if len(weight_shape) < 2:
        raise ValueError(f"init_layer: weight_shape must have at least 2 dimensions, got {tuple(weight_shape)}")
    if isinstance(rank, bool) or int(rank) != rank or rank < 1:
        raise ValueError(f"init_layer: rank must be a positive integer, got {rank!r}")
    out_features = int(weight_shape[0])
    in_shape = tuple(int(d) for d in weight_shape[1:])
    in_features = math.prod(in_shape)
    if out_features < 1 or in_features < 1:
        raise ValueError(f"init_layer: weight_shape has a zero-sized dimension: {tuple(weight_shape)}")
    asked_alpha = float(rank) if alpha is None else float(alpha)
    k = min(int(rank), out_features, in_features)
    u = _random_orthonormal(out_features, k, generator)
    v = _random_orthonormal(in_features, k, generator)
    return TriLoRALayer(
        u=u.to(device=device, dtype=dtype),
        s=torch.full((k,), float(s_init), dtype=dtype, device=device),
        vt=v.T.reshape(k, *in_shape).to(device=device, dtype=dtype).contiguous(),
        alpha=asked_alpha * k / int(rank),
    )


def orthogonality_penalty(u: Tensor, vt: Tensor) -> Tensor:
    """AdaLoRA's ||U^T U - I||_F + ||V^T V - I||_F (V = vt.flatten(1).T), differentiable, float32."""
    u32 = u.to(torch.float32)
    v32 = vt.to(torch.float32).flatten(1)  # [r, in]: rows are V's columns
    eye_u = torch.eye(u32.shape[1], dtype=torch.float32, device=u32.device)
    eye_v = torch.eye(v32.shape[0], dtype=torch.float32, device=v32.device)
    return torch.linalg.matrix_norm(u32.T @ u32 - eye_u) + torch.linalg.matrix_norm(v32 @ v32.T - eye_v)


def lr_lambda(schedule: str, total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Learning-rate factor per step for ``torch.optim.lr_scheduler.LambdaLR``.

    Linear warm-up from 0 over ``warmup_steps``, then "constant" (1), "linear" (down to 0 at
    ``total_steps``) or "cosine" (half a cosine down to 0 at ``total_steps``).
    """
    if schedule not in SCHEDULES:
        raise ValueError(
            f"unknown learning-rate schedule {schedule!r}; expected one of {', '.join(map(repr, SCHEDULES))}"
        )
    if total_steps < 0 or warmup_steps < 0:
        raise ValueError(
            f"lr_lambda: steps must not be negative, got total_steps={total_steps}, warmup_steps={warmup_steps}"
        )
    decay_steps = max(1, total_steps - warmup_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        progress = min(1.0, (step - warmup_steps) / decay_steps)
        if schedule == "linear":
            return 1.0 - progress
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return factor
