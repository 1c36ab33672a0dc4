"""T-LoRA's noise-level-dependent rank while training (``timestep_min_rank``): around each forward
and its backward, every diffusion-model adapter uses, per sample, only the first r(t) directions of
s for the sample's noise level t (trilora_core.timestep_rank). The file records the schedule and
keeps its bands apart, and Load TriLoRA applies the same mask by the sampling step's noise level
(nodes/noise_rank.py)."""
from __future__ import annotations

import contextlib

import torch

from ...trilora_core import rank_mask


@contextlib.contextmanager
def timestep_rank_masks(min_rank: int, adapters: dict, targets: list, levels, positions: list[int]):
    """Sets each diffusion-model adapter's (``targets``', not the text encoders') ``rank_mask``
    ([batch, r]) for the noise levels (1 the noisiest) of the batch's samples at ``positions``,
    and clears it after; kept in place through the backward, where gradient checkpointing
    recomputes the forward. min_rank 0: nothing (every direction)."""
    if not min_rank:
        yield
        return
    adapters = [adapters[t.prefix] for t in targets]
    levels = [float(levels[p]) for p in positions]
    by_rank: dict[int, torch.Tensor] = {}
    for adapter in adapters:
        r = adapter.trilora_s.shape[0]
        if r not in by_rank:
            by_rank[r] = rank_mask(torch.tensor(levels), r, min_rank).to(adapter.trilora_s.device)
        adapter.rank_mask = by_rank[r]
    try:
        yield
    finally:
        for adapter in adapters:
            adapter.rank_mask = None
