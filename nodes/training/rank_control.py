"""Mechanisms on the adapters' s while training only (the file stays plain TriLoRA, sampling uses
every direction): T-LoRA's noise-level-dependent rank (``timestep_min_rank``) and AdaLoRA's
importance-driven rank budget (``rank_budget``). The math is in trilora_core (timestep_rank.py,
rank_budget.py); make bench-method weighs them."""
from __future__ import annotations

import contextlib

import torch

from ...trilora_core import RankBudget, all_finite, rank_mask


class RankControl:
    def __init__(self, args, adapters: dict):
        self.min_rank, self.adapters = args.timestep_min_rank, adapters
        self.budget = None
        if args.rank_budget < 1:
            factors = {p: (a.trilora_u, a.trilora_s, a.trilora_vt) for p, a in adapters.items()}
            self.budget = RankBudget(factors, args.rank_budget, args.steps)

    @contextlib.contextmanager
    def masks(self, levels: list[float]):
        """Around one forward and its backward (gradient checkpointing recomputes the forward in
        the backward): each adapter uses, for sample j, the first r(levels[j]) directions."""
        if not self.min_rank:
            yield
            return
        by_rank: dict[int, torch.Tensor] = {}
        for adapter in self.adapters.values():
            r = adapter.trilora_s.shape[0]
            if r not in by_rank:
                by_rank[r] = rank_mask(torch.tensor(levels), r, self.min_rank).to(adapter.trilora_s.device)
            adapter.rank_mask = by_rank[r]
        try:
            yield
        finally:
            for adapter in self.adapters.values():
                adapter.rank_mask = None

    def after_step(self, k: int, params) -> None:
        """After optimizer step k (0-based, of this run's steps), its gradients unscaled and still
        there: AdaLoRA's sensitivities (from finite gradients only: fp16 steps the scaler skips
        are not observed), then its mask, as AdaLoRA's RankAllocator runs after the optimizer."""
        if self.budget is None:
            return
        if all_finite(p.grad for p in params):
            self.budget.observe()
        self.budget.apply(k)
