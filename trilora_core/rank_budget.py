"""AdaLoRA's importance-driven rank budget during training: the least important directions of s,
over all layers together, are set to zero on a schedule.

After AdaLoRA (Zhang et al., "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning",
ICLR 2023, arXiv 2303.10512), whose SVD-shaped update P diag(lambda) Q TriLoRA shares:

- Sensitivity of a parameter: I = |w * dL/dw|, smoothed I_bar = b1 I_bar + (1 - b1) I, and its
  uncertainty U_bar = b2 U_bar + (1 - b2) |I - I_bar| (b1 = b2 = 0.85); score = I_bar * U_bar.
- Importance of direction i of a layer: score(s_i) + mean score(U[:, i]) + mean score(Vt[i]).
- Budget (directions kept over all layers): the initial total b0 until step t_init, then the
  cubic b(t) = b_T + (b0 - b_T) (1 - (t - t_init) / (T - t_final - t_init)) ** 3, b_T from
  step T - t_final on. Every ``interval`` steps while it falls the directions outside the top b(t)
  get s = 0 (they may come back between masks, as in AdaLoRA); from T - t_final on one fixed mask
  of the final budget applies after every step.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

BETA = 0.85  # AdaLoRA's beta1 = beta2


def budget(step: int, total_steps: int, initial: int, final: int, t_init: int, t_final: int) -> int:
    """Directions kept after optimizer step ``step`` (0-based) of ``total_steps``."""
    if step < t_init:
        return initial
    span = total_steps - t_final - t_init
    if span <= 0 or step >= total_steps - t_final:
        return final
    left = 1.0 - (step - t_init) / span
    return final + int((initial - final) * left**3 + 1e-9)


class RankBudget:
    """Tracks each direction's importance and masks s to the budget.

    ``layers``: {name: (u [out, r], s [r], vt [r, ...])}, the trainable factors (their .grad
    read after each backward). ``keep``: share of all directions kept at the end, in (0, 1].
    The schedule follows AdaLoRA's: pruning starts after 10 % of the steps (t_init) and reaches
    the final budget with 30 % left (t_final), a new mask every ``interval`` steps."""

    def __init__(self, layers: dict, keep: float, total_steps: int, interval: int = 10):
        if not 0 < keep <= 1:
            raise ValueError(f"rank budget: keep must be in (0, 1], got {keep}")
        self.layers, self.total, self.interval = layers, int(total_steps), max(1, int(interval))
        self.initial = sum(int(s.shape[0]) for _, s, _ in layers.values())
        self.final = max(1, math.ceil(keep * self.initial))
        self.t_init, self.t_final = int(0.1 * total_steps), int(0.3 * total_steps)
        self.sens: dict[str, list[Tensor]] = {}
        self.unc: dict[str, list[Tensor]] = {}
        self.final_kept: dict[str, Tensor] | None = None

    def observe(self) -> None:
        """Updates the smoothed sensitivities from the factors' gradients (after the backward)."""
        for name, factors in self.layers.items():
            now = [(p.detach() * p.grad.detach()).abs().float() if p.grad is not None
                   else torch.zeros_like(p, dtype=torch.float32) for p in factors]
            if name not in self.sens:
                self.sens[name] = [torch.zeros_like(t) for t in now]
                self.unc[name] = [torch.zeros_like(t) for t in now]
            for i, t in enumerate(now):
                self.unc[name][i].mul_(BETA).add_((1 - BETA) * (t - self.sens[name][i]).abs())
                self.sens[name][i].mul_(BETA).add_((1 - BETA) * t)

    def importance(self) -> dict[str, Tensor]:
        """{name: [r]} AdaLoRA's triplet importance of each direction."""
        out = {}
        for name, (_, s, _) in self.layers.items():
            if name not in self.sens:
                out[name] = torch.zeros(s.shape[0])
                continue
            su, ss, sv = (a * b for a, b in zip(self.sens[name], self.unc[name], strict=True))
            out[name] = (ss + su.mean(0) + sv.flatten(1).mean(1)).cpu()
        return out

    def apply(self, step: int) -> int:
        """After optimizer step ``step`` (0-based): zero s outside the budget where the schedule
        masks (every ``interval`` steps while the budget falls, every step with one fixed mask
        from T - t_final on); returns the budget."""
        b = budget(step, self.total, self.initial, self.final, self.t_init, self.t_final)
        if step < self.t_init:
            return b
        if step >= self.total - self.t_final:
            if self.final_kept is None:
                self.final_kept = top_directions(self.importance(), self.final)
            kept = self.final_kept
        elif (step - self.t_init) % self.interval == 0:
            kept = top_directions(self.importance(), b)
        else:
            return b
        with torch.no_grad():
            for name, (_, s, _) in self.layers.items():
                s.mul_(kept[name].to(device=s.device, dtype=s.dtype))
        return b


def top_directions(importance: dict[str, Tensor], keep: int) -> dict[str, Tensor]:
    """{name: [r] 0/1 float} keeping the ``keep`` most important directions over all layers (ties
    broken by layer name and index, so the mask is the same on every run)."""
    names = sorted(importance)
    flat = torch.cat([importance[n].float().reshape(-1) for n in names])
    order = torch.sort(flat, descending=True, stable=True).indices[:keep]
    chosen = torch.zeros(flat.shape[0])
    chosen[order] = 1.0
    out, at = {}, 0
    for n in names:
        r = importance[n].numel()
        out[n] = chosen[at:at + r].clone()
        at += r
    return out
