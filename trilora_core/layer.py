"""One TriLoRA adapter: delta W = (alpha / r) * U @ diag(s) @ Vt."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Math runs in float32 (float64 when the factors are float64): half storage is too coarse."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(eq=False)  # tensors have no single truth value: compare layers by identity
class TriLoRALayer:
    """Factors of one adapted weight.

    ``u`` is [out, r], ``s`` is [r], ``vt`` is [r, in] for a linear weight or
    [r, in, *kernel] for a conv weight (1-D, 2-D or 3-D kernel). Any floating dtype may be
    stored; every method computes in float32 (float64 for float64 factors).
    """

    u: Tensor  # [out, r]
    s: Tensor  # [r]
    vt: Tensor  # [r, in] or [r, in, *kernel]
    alpha: float

    def __post_init__(self) -> None:
        # Shape checks only (cheap, no data access) so broken layers fail where they are made.
        if self.u.ndim != 2:
            raise ValueError(f"TriLoRALayer.u must be [out, rank], got shape {list(self.u.shape)}")
        if self.s.ndim != 1:
            raise ValueError(f"TriLoRALayer.s must be [rank], got shape {list(self.s.shape)}")
        if not 2 <= self.vt.ndim <= 5:
            raise ValueError(
                f"TriLoRALayer.vt must be [rank, in] or [rank, in, *kernel], got shape {list(self.vt.shape)}"
            )
        rank = self.s.shape[0]
        if rank < 1:
            raise ValueError("TriLoRALayer rank must be at least 1")
        if self.u.shape[1] != rank or self.vt.shape[0] != rank:
            raise ValueError(
                f"TriLoRALayer ranks disagree: u {list(self.u.shape)}, s {list(self.s.shape)}, vt {list(self.vt.shape)}"
            )
        for name in ("u", "s", "vt"):
            if not getattr(self, name).is_floating_point():
                raise ValueError(f"TriLoRALayer.{name} must be a floating-point tensor")
        self.alpha = float(self.alpha)
        if not math.isfinite(self.alpha):
            raise ValueError(f"TriLoRALayer alpha must be finite, got {self.alpha}")

    @property
    def rank(self) -> int:
        return self.s.shape[0]

    @property
    def out_features(self) -> int:
        return self.u.shape[0]

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the weight this layer adapts: (out, in) or (out, in, *kernel)."""
        return (self.u.shape[0], *self.vt.shape[1:])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def dtype(self) -> torch.dtype:
        return self.u.dtype

    @property
    def device(self) -> torch.device:
        return self.u.device

    def delta(self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
        """The weight update, shaped like the weight; differentiable in the factors."""
        work = compute_dtype(self.u.dtype)
        u = self.u.to(device=device, dtype=work)
        s = self.s.to(device=device, dtype=work)
        vt = self.vt.to(device=device, dtype=work).reshape(self.rank, -1)
        # Scale the small factor, not the big product.
        delta = (u * (s * self.scale)) @ vt
        return delta.reshape(self.weight_shape).to(dtype)

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> TriLoRALayer:
        """A new layer with all three factors moved/cast; alpha is unchanged."""
        return TriLoRALayer(
            u=self.u.to(device=device, dtype=dtype),
            s=self.s.to(device=device, dtype=dtype),
            vt=self.vt.to(device=device, dtype=dtype),
            alpha=self.alpha,
        )
