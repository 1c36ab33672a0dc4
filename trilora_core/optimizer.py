"""The optimizer of a training run, with no model: per-factor learning rates, the optimizers,
learning-rate schedules, and optimizer state as plain tensors in the resume side-file that sits
beside a checkpoint (``<name>.optim``). (Initial factors, losses and seeds are in training.py.)

Why s gets its own learning rate: with Adam every parameter moves by about the learning rate per
step. A change of s_i by e changes delta W by e * (alpha / r) * u_i v_i^T, whose entries are only
about e / sqrt(out * in) because u_i and v_i are unit vectors; and at s = 0 the gradients of U
and V are zero, so s must move first. ``s_learning_rate`` scales s's step so that one step moves
the weight by about ``learning_rate * s_lr_scale * alpha / r`` per entry, as a LoRA step does.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from .layer import TriLoRALayer
from .safetensors_io import SafetensorsReader, atomic_write_bytes, file_content_hash, serialize
from .suffixes import TRILORA_PARTS

OPTIMIZERS = ("AdamW", "Adam", "SGD", "RMSprop")
SCHEDULES = ("constant", "cosine", "linear")
_U, _S, _VT = TRILORA_PARTS  # parameter names are the file's: <prefix>.trilora_u ...
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
        uv["names"] += [f"{prefix}.{_U}", f"{prefix}.{_VT}"]
        lr = s_learning_rate(learning_rate, weight_shapes[prefix], s.shape[0], s_lr_scale)
        # No weight decay on s: with s's large learning rate, AdamW's decoupled decay (lr * wd * s)
        # would pull the learned singular values back far harder than it pulls on U and V.
        group = by_lr.setdefault(lr, {"params": [], "names": [], "lr": lr, "base_lr": lr, "weight_decay": 0.0})
        group["params"].append(s)
        group["names"].append(f"{prefix}.{_S}")
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


# --------------------------------------------------------------------------- the resume side-file

OPTIMIZER_FILE_SUFFIX = ".optim"  # not a model extension, so the side-file never shows in the loras list
FOR_HASH_KEY = "trilora_for_hash"  # the content hash of the adapter file the side-file belongs to
PARAM_PREFIX = "param."  # the raw (not canonicalized) factors the optimizer state refers to


def optimizer_file_path(path: str | os.PathLike[str]) -> str:
    """``<adapter file without extension>.optim``."""
    root, _ = os.path.splitext(os.fspath(path))
    return root + OPTIMIZER_FILE_SUFFIX


def write_optimizer_file(path: str | os.PathLike[str], optimizer: torch.optim.Optimizer, optimizer_name: str) -> str:
    """Writes the side-file of the adapter file at ``path`` (already written): the optimizer's
    state (``optimizer_state_tensors``), each parameter as ``param.<name>`` (float32 as trained;
    the adapter file holds them canonicalized), and the adapter file's content hash, so a
    side-file left beside another version of the file is never used. Atomic; returns its path."""
    tensors = optimizer_state_tensors(optimizer)
    for group in optimizer.param_groups:
        for name, param in zip(group["names"], group["params"], strict=True):
            tensors[PARAM_PREFIX + name] = param.detach().cpu().contiguous().clone()
    meta = {FOR_HASH_KEY: file_content_hash(path), "optimizer": optimizer_name}
    side = optimizer_file_path(path)
    atomic_write_bytes(side, serialize(tensors, meta))
    return side


def read_optimizer_file(path: str | os.PathLike[str], layers: Mapping[str, TriLoRALayer]
                        ) -> tuple[dict[str, TriLoRALayer], dict[str, Tensor]] | None:
    """(the raw layers the optimizer state refers to, all the side-file's tensors for
    ``load_optimizer_state``) from the side-file of the adapter file at ``path``, whose layers
    are ``layers`` (alphas are taken from them). None when there is no side-file. Raises
    ``StaleOptimizerFile`` when it belongs to another version of the file; other errors (KeyError
    for a missing factor, safetensors' errors) pass through."""
    side = optimizer_file_path(path)
    if not os.path.exists(side):
        return None
    with SafetensorsReader(side) as reader:
        if reader.metadata().get(FOR_HASH_KEY) != file_content_hash(path):
            raise StaleOptimizerFile(side)
        tensors = {k: reader.tensor(k) for k in reader.keys()}
    raw = {prefix: TriLoRALayer(*(tensors[f"{PARAM_PREFIX}{prefix}.{f}"] for f in TRILORA_PARTS), layer.alpha)
           for prefix, layer in layers.items()}
    return raw, tensors


class StaleOptimizerFile(ValueError):
    """The side-file was written for another version of its adapter file."""
