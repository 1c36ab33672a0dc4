"""One training run's math, with no model and no optimizer: seeded initial factors, the
orthogonality penalty, the loss of a prediction error, seeded data streams, finiteness checks.
(The optimizer, its learning rates, schedule and saved state are in optimizer.py.)"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

from .layer import TriLoRALayer

LOSS_FUNCTIONS = ("MSE", "L1", "Huber", "SmoothL1")


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


def loss_function(name: str) -> Callable[[Tensor], Tensor]:
    """The loss of a prediction error tensor (prediction - target), reduced to a scalar mean."""
    if name == "MSE":
        return lambda err: err.square().mean()
    if name == "L1":
        return lambda err: err.abs().mean()
    if name == "Huber":
        return lambda err: torch.nn.functional.huber_loss(err, torch.zeros_like(err))
    if name == "SmoothL1":
        return lambda err: torch.nn.functional.smooth_l1_loss(err, torch.zeros_like(err))
    raise ValueError(f"unknown loss_function {name!r}; expected one of {', '.join(LOSS_FUNCTIONS)}")


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed for one purpose (e.g. ("noise", step, micro_step)) of a run's seed.

    Each random draw gets its own generator seeded this way, so the stream at step k does not
    depend on how the run got there: a resumed run draws what an uninterrupted one would."""
    text = ":".join(str(p) for p in (int(seed), *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**63 - 1)


def generator(seed: int, *parts: object) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(derive_seed(seed, *parts))


def sample_indices(seed: int, num_items: int, start: int, count: int) -> list[int]:
    """Items ``start .. start + count - 1`` of an endless stream that visits all ``num_items``
    once per epoch, in a fresh seeded order each epoch."""
    if num_items < 1:
        raise ValueError("sample_indices: num_items must be at least 1")
    out: list[int] = []
    epoch_cache: dict[int, list[int]] = {}
    for position in range(start, start + count):
        epoch, offset = divmod(position, num_items)
        if epoch not in epoch_cache:
            epoch_cache[epoch] = torch.randperm(num_items, generator=generator(seed, "order", epoch)).tolist()
        out.append(epoch_cache[epoch][offset])
    return out


def all_finite(tensors: Iterable[Tensor]) -> bool:
    tensors = [t for t in tensors if t is not None]
    if not tensors:
        return True
    # Each tensor's min and max hold any NaN or inf it has: one pass each (isfinite costs about
    # ten times as much), then one reduction and one sync for the lot.
    return bool(torch.stack([bound for t in tensors for bound in torch.aminmax(t.detach())]).isfinite().all())
