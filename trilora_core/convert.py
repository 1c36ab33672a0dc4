"""Exact conversion between standard LoRA / LoCon factors and TriLoRA layers."""

from __future__ import annotations

import torch
from torch import Tensor

from .canonical import canonicalize
from .layer import TriLoRALayer, compute_dtype

FOLDS = ("split", "up", "down")


def lora_to_trilora(
    up: Tensor, down: Tensor, alpha: float | Tensor | None = None, mid: Tensor | None = None
) -> TriLoRALayer:
    """The canonical TriLoRA layer with the same delta W as a LoRA pair.

    ``up`` is [out, r] (or [out, r, 1, ...] for LoCon), ``down`` is [r, in] or
    [r, in, *kernel]; ``alpha=None`` means alpha = r. The rank never grows.
    """
    if mid is not None:
        # Tucker LoCon: delta is a full conv tensor, not rank r in the flattened out x in*k
        # sense, so no exact TriLoRA layer of that rank exists.
        raise ValueError(
            "LoCon Tucker decomposition (lora_mid) is not supported: its delta W is not a rank-r "
            "matrix, so it cannot be converted exactly; load the file with ComfyUI's LoraLoader"
        )
    if up.ndim < 2 or any(d != 1 for d in up.shape[2:]):
        raise ValueError(f"lora_up must be [out, rank] or [out, rank, 1, 1], got shape {list(up.shape)}")
    if not 2 <= down.ndim <= 5:
        raise ValueError(f"lora_down must be [rank, in] or [rank, in, *kernel], got shape {list(down.shape)}")
    if up.shape[1] != down.shape[0]:
        raise ValueError(
            f"LoRA ranks disagree: lora_up has shape {list(up.shape)}, lora_down has shape {list(down.shape)}"
        )
    r = up.shape[1]
    alpha = float(r) if alpha is None else float(alpha)
    ones = torch.ones(r, dtype=up.dtype, device=up.device)
    return canonicalize(TriLoRALayer(u=up.reshape(up.shape[0], r), s=ones, vt=down, alpha=alpha))


def trilora_to_lora(layer: TriLoRALayer, fold: str = "split") -> tuple[Tensor, Tensor, float]:
    """(up, down, alpha) of a standard LoRA / LoCon with the same delta W.

    ``fold`` says where s goes: "split" (sqrt(s) on each side), "up" or "down". ``down`` keeps
    vt's shape; ``up`` is [out, r] for linear and [out, r, 1, ...] for conv (kohya LoCon
    layout). Factors come back in the dtype of ``layer.u``.
    """
    if fold not in FOLDS:
        raise ValueError(f"trilora_to_lora: fold must be one of {', '.join(FOLDS)}; got {fold!r}")
    work = compute_dtype(layer.u.dtype)
    with torch.no_grad():
        u = layer.u.detach().to(work)
        s = layer.s.detach().to(work)
        vt = layer.vt.detach().to(work).reshape(layer.rank, -1)
        if fold == "split":
            # |s| on both sides and the sign on down keeps non-canonical (negative) s exact.
            root = s.abs().sqrt()
            up, down = u * root, vt * (root * torch.sign(s))[:, None]
        elif fold == "up":
            up, down = u * s, vt
        else:
            up, down = u, vt * s[:, None]
    dtype = layer.u.dtype
    kernel_ones = (1,) * (layer.vt.ndim - 2)
    up = up.reshape(layer.out_features, layer.rank, *kernel_ones).to(dtype).contiguous()
    down = down.reshape(layer.vt.shape).to(dtype).contiguous()
    return up, down, layer.alpha
