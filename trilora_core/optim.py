"""Training plumbing that needs no model: per-factor learning rates, optimizers, losses, seeded
data streams, and optimizer state as plain tensors (for safetensors checkpoints).

Why s gets its own learning rate: with Adam every parameter moves by about the learning rate per
step. A change of s_i by e changes delta W by e * (alpha / r) * u_i v_i^T, whose entries are only
about e / sqrt(out * in) because u_i and v_i are unit vectors; and at s = 0 the gradients of U
and V are zero, so s must move first. ``s_learning_rate`` scales s's step so that one step moves
the weight by about ``learning_rate * s_lr_scale * alpha / r`` per entry, as a LoRA step does.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor

OPTIMIZERS = ("AdamW", "Adam", "SGD", "RMSprop")
LOSS_FUNCTIONS = ("MSE", "L1", "Huber", "SmoothL1")
_STATE_PREFIX = "state."


def s_learning_rate(learning_rate: float, weight_shape: Sequence[int], rank: int, s_lr_scale: float) -> float:
    """Learning rate of s for one layer: learning_rate * s_lr_scale * sqrt(out * in / rank).

    One Adam step moves every s_i by about this much, which changes each entry of
    U diag(s) Vt by about learning_rate * s_lr_scale (the r rank-one terms add up like random
    signs: sqrt(r) * step / sqrt(out * in)).
    """
    if rank < 1:
        raise ValueError(f"s_learning_rate: rank must be at least 1, got {rank}")
    out_features = int(weight_shape[0])
    in_features = math.prod(int(d) for d in weight_shape[1:])
    return float(learning_rate) * float(s_lr_scale) * math.sqrt(out_features * in_features / rank)


def param_groups(
    factors: Mapping[str, tuple[Tensor, Tensor, Tensor]],
    weight_shapes: Mapping[str, Sequence[int]],
    learning_rate: float,
    s_lr_scale: float,
) -> list[dict]:
    """Optimizer parameter groups: all U and Vt at ``learning_rate``, each s at its
    ``s_learning_rate`` and without weight decay. Layers whose s share a learning rate share a group (few groups keep
    foreach optimizers fast). Every group has ``base_lr`` (for schedules) and ``names``
    (``<prefix>.trilora_u`` ...) in the order of its params."""
    uv: dict = {"params": [], "names": [], "lr": float(learning_rate), "base_lr": float(learning_rate)}
    by_lr: dict[float, dict] = {}
    for prefix in sorted(factors):
        u, s, vt = factors[prefix]
        uv["params"] += [u, vt]
        uv["names"] += [f"{prefix}.trilora_u", f"{prefix}.trilora_vt"]
        lr = s_learning_rate(learning_rate, weight_shapes[prefix], s.shape[0], s_lr_scale)
        # No weight decay on s: with s's large learning rate, AdamW's decoupled decay (lr * wd * s)
        # would pull the learned singular values back far harder than it pulls on U and V.
        group = by_lr.setdefault(lr, {"params": [], "names": [], "lr": lr, "base_lr": lr, "weight_decay": 0.0})
        group["params"].append(s)
        group["names"].append(f"{prefix}.trilora_s")
    return [uv, *(by_lr[lr] for lr in sorted(by_lr))]


def make_optimizer(name: str, groups: list[dict]) -> torch.optim.Optimizer:
    """One of OPTIMIZERS with torch's defaults (AdamW: weight decay 0.01), as ComfyUI's
    TrainLoraNode builds them."""
    classes = {"AdamW": torch.optim.AdamW, "Adam": torch.optim.Adam, "SGD": torch.optim.SGD,
               "RMSprop": torch.optim.RMSprop}
    if name not in classes:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZERS)}")
    if name in ("AdamW", "Adam"):
        try:  # one fused kernel for all factors instead of ten small ops per factor
            return classes[name](groups, lr=groups[0]["lr"], fused=True)
        except RuntimeError:  # a device (or torch) without the fused kernel
            pass
    return classes[name](groups, lr=groups[0]["lr"])


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


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
    """The optimizer's per-parameter state as ``state.<param name>.<key>`` tensors (CPU),
    using the ``names`` of the param groups. Non-tensor entries become 0-d float64 tensors."""
    tensors: dict[str, Tensor] = {}
    for group in optimizer.param_groups:
        for name, param in zip(group["names"], group["params"], strict=True):
            for key, value in optimizer.state.get(param, {}).items():
                if value is None:
                    continue
                if not isinstance(value, Tensor):
                    value = torch.tensor(float(value), dtype=torch.float64)
                tensors[f"{_STATE_PREFIX}{name}.{key}"] = value.detach().to("cpu").contiguous().clone()
    return tensors


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: Mapping[str, Tensor]) -> None:
    """Restores what ``optimizer_state_tensors`` wrote. Raises ValueError (naming the first
    problem) when the tensors do not fit the optimizer's parameters; nothing is changed then."""
    by_name: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        if not key.startswith(_STATE_PREFIX):
            continue
        name, _, field = key[len(_STATE_PREFIX):].rpartition(".")
        by_name.setdefault(name, {})[field] = value
    params = {n: p for g in optimizer.param_groups for n, p in zip(g["names"], g["params"], strict=True)}
    if set(by_name) != set(params):
        missing = sorted(set(params) - set(by_name)) or sorted(set(by_name) - set(params))
        raise ValueError(f"optimizer state does not match the adapter's parameters (first difference: {missing[0]})")
    new_state = {}
    for name, fields in by_name.items():
        param = params[name]
        state = {}
        for field, value in fields.items():
            if field == "step" or value.ndim == 0:
                state[field] = value.to(dtype=torch.float32) if field == "step" else value.clone()
            else:
                if value.shape != param.shape:
                    raise ValueError(f"optimizer state {name}.{field} has shape {list(value.shape)}, "
                                     f"the parameter {list(param.shape)}")
                # In the parameter's own layout, as the optimizer makes its state: a fused kernel
                # rounds differently when the two layouts differ.
                state[field] = torch.empty_like(param, memory_format=torch.preserve_format).copy_(value)
        new_state[param] = state
    for param, state in new_state.items():
        optimizer.state[param] = state
