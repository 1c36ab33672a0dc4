"""Random layers and reference deltas for the trilora_core tests."""

from __future__ import annotations

import math
import os

import torch
from hypothesis import settings
from hypothesis import strategies as st

from trilora_core import TriLoRALayer

# Small, reproducible property runs (applied per test, not as a global profile, so other test
# suites keep their own hypothesis settings); the core suite stays fast on 2 cores.
# TRILORA_CORE_EXAMPLES=N runs N random (not derandomized) examples per property for a deeper search.
_DEEP_EXAMPLES = os.environ.get("TRILORA_CORE_EXAMPLES")
PROPERTY = settings(
    max_examples=int(_DEEP_EXAMPLES or 40),
    deadline=None,
    derandomize=_DEEP_EXAMPLES is None,
    database=None,
    print_blob=True,
)

STORAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Kernel shapes after [rank, in]: linear, 1-D, 2-D and 3-D convs.
KERNELS = ((), (1,), (3,), (1, 1), (3, 3), (2, 1, 3))

# Relative Frobenius error allowed when canonical factors are stored in each dtype: the cast
# alone rounds every entry by up to half an ulp (2^-11 float16, 2^-8 bfloat16).
DELTA_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def random_layer(
    out: int,
    in_features: int,
    kernel: tuple[int, ...],
    rank: int,
    seed: int,
    dtype: torch.dtype = torch.float32,
    alpha: float = 4.0,
    zero_tail: int = 0,
) -> TriLoRALayer:
    """A non-canonical layer: gaussian U and Vt, s of both signs (last ``zero_tail`` zero)."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(out, rank, generator=gen)
    s = torch.randn(rank, generator=gen) * 3
    if zero_tail:
        s[rank - min(zero_tail, rank) :] = 0
    vt = torch.randn(rank, in_features, *kernel, generator=gen)
    return TriLoRALayer(u=u.to(dtype), s=s.to(dtype), vt=vt.to(dtype), alpha=alpha)


@st.composite
def layers(draw, dtypes=STORAGE_DTYPES, max_dim: int = 20, max_rank: int = 10) -> TriLoRALayer:
    """Layers of random shape (often out < r or in < r), rank, storage dtype and alpha."""
    return random_layer(
        out=draw(st.integers(1, max_dim)),
        in_features=draw(st.integers(1, max_dim)),
        kernel=draw(st.sampled_from(KERNELS)),
        rank=draw(st.integers(1, max_rank)),
        seed=draw(st.integers(0, 2**31 - 1)),
        dtype=draw(st.sampled_from(dtypes)),
        alpha=draw(st.sampled_from((1.0, 0.5, 4.0, 16.0, 3.7))),
        zero_tail=draw(st.integers(0, 2)),
    )


def reference_delta(layer: TriLoRALayer) -> torch.Tensor:
    """delta W in float64 straight from the definition, from the stored values."""
    u, s, vt = (t.detach().to(torch.float64) for t in (layer.u, layer.s, layer.vt))
    flat = (layer.alpha / s.shape[0]) * u @ torch.diag(s) @ vt.reshape(s.shape[0], -1)
    return flat.reshape(u.shape[0], *vt.shape[1:])


def lora_delta(up: torch.Tensor, down: torch.Tensor, alpha: float | None) -> torch.Tensor:
    r = up.shape[1]
    alpha = float(r) if alpha is None else alpha
    flat = (alpha / r) * up.to(torch.float64).flatten(1) @ down.to(torch.float64).flatten(1)
    return flat.reshape(up.shape[0], *down.shape[1:])


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected||_F / ||expected||_F (absolute error when expected is zero)."""
    diff = torch.linalg.vector_norm((actual.to(torch.float64) - expected.to(torch.float64)).flatten()).item()
    norm = torch.linalg.vector_norm(expected.to(torch.float64).flatten()).item()
    return diff / norm if norm > 0 else diff


def delta_tolerance(layer: TriLoRALayer) -> float:
    """Allowed relative error of a canonical form of ``layer``.

    DELTA_RTOL, widened for inputs whose factors cancel heavily (e.g. out = in = 1 with rank
    10): float32 QR/SVD are accurate to eps relative to ||U|| ||s|| ||V||, not to ||delta||,
    and the float32 delta of the input itself is no more accurate than that.
    """
    u, s, vt = (t.detach().to(torch.float64) for t in (layer.u, layer.s, layer.vt))
    factor_norm = (layer.alpha / layer.rank) * u.norm() * s.abs().max() * vt.norm()
    delta_norm = torch.linalg.vector_norm(reference_delta(layer).flatten())
    cancellation = float(factor_norm / delta_norm) if delta_norm > 0 else 1.0
    return DELTA_RTOL[layer.u.dtype] * max(1.0, cancellation / 100)


def max_orthonormality_error(layer: TriLoRALayer) -> float:
    u = layer.u.to(torch.float64)
    v = layer.vt.to(torch.float64).reshape(layer.rank, -1)
    eye = torch.eye(layer.rank, dtype=torch.float64)
    return max((u.T @ u - eye).abs().max().item(), (v @ v.T - eye).abs().max().item())


def in_features_flat(layer: TriLoRALayer) -> int:
    return math.prod(layer.weight_shape[1:])
