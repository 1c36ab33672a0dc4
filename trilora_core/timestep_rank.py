"""Noise-level-dependent rank (T-LoRA's timestep masking): fewer active directions at the
noisiest levels.

T-LoRA (Soboleva et al., "T-LoRA: Single Image Diffusion Model Customization Without
Overfitting", AAAI 2026, arXiv 2507.05964) uses only the first r(t) rank components at
timestep t:

    r(t) = floor(((T - t) / T) ** power * (R - R_min)) + R_min

(R the rank, R_min the directions kept at the noisiest level, power 1 a linear schedule: the form
LyCORIS's ``tlora`` and SimpleTuner use). With TriLoRA the mask falls on s: direction i of a
sample is used only where i < r(t). Here t is the noise level as ``sample_noise_levels`` draws it,
in [0, 1], 1 the noisiest; the trainer turns level t into sigma = percent_to_sigma(1 - t), so the
same mask at sampling is a function of ComfyUI's sampling percent p = 1 - t.

Direction order matters: the mask keeps a prefix of the directions the mask trained, so a file
meant to be masked must keep each band of the schedule apart (``nested_bands``); the global
canonical SVD of the whole delta mixes the bands.
"""

from __future__ import annotations

import json
import math

import torch
from torch import Tensor

from .canonical import canonicalize
from .layer import TriLoRALayer


def active_directions(level: float, rank: int, min_rank: int, power: float = 1.0) -> int:
    """r(t) of T-LoRA's schedule: directions active at noise level ``level`` in [0, 1] (1 the
    noisiest). ``min_rank`` is clipped to ``rank``. Raises ValueError on a level outside [0, 1],
    rank < 1, min_rank < 0 or power <= 0."""
    if not 0.0 <= level <= 1.0:
        raise ValueError(f"noise level must be in [0, 1], got {level}")
    if rank < 1 or min_rank < 0 or not power > 0:
        raise ValueError(f"need rank >= 1, min_rank >= 0 and power > 0, got {rank}, {min_rank}, {power}")
    low = min(int(min_rank), int(rank))
    # The small epsilon keeps exact fractions (0.5 * 4 = 2) from rounding down through float error.
    return int((1.0 - level) ** power * (rank - low) + 1e-9) + low


def rank_mask(levels: Tensor, rank: int, min_rank: int, power: float = 1.0) -> Tensor:
    """[n, rank] float32 of 0 and 1: row j keeps the first ``active_directions(levels[j])``
    directions. ``levels``: [n] noise levels in [0, 1]."""
    counts = torch.tensor([active_directions(float(t), rank, min_rank, power) for t in levels.reshape(-1)])
    return (torch.arange(rank)[None, :] < counts[:, None]).to(torch.float32)


def band_starts(rank: int, min_rank: int, power: float = 1.0) -> list[tuple[int, float]]:
    """Where the active count steps up over sampling: [(directions, start percent)], ascending,
    the first (min(min_rank, rank) or the first step's count, 0.0). From sampling percent p on
    (noise level 1 - p), ``active_directions(1 - p)`` is the count of the last entry whose start
    is <= p, so a sampler that switches the active prefix at these percents (by sigma <=
    percent_to_sigma(start), as ComfyUI's hook keyframes do) reproduces the training mask."""
    active_directions(0.0, rank, min_rank, power)  # the same checks
    low = min(int(min_rank), int(rank))
    starts = [(active_directions(1.0, rank, min_rank, power), 0.0)]
    for k in range(low + 1, rank + 1):
        # count >= k from p ** power * (R - low) + 1e-9 >= k - low on: the smallest such p, then
        # moved by ulps until the schedule itself (evaluated at level 1 - p) agrees at the boundary.
        p = max((k - low - 1e-9) / (rank - low), 0.0) ** (1.0 / power)
        while p < 1.0 and active_directions(1.0 - p, rank, min_rank, power) < k:
            p = math.nextafter(p, 2.0)
        while p > 0.0 and active_directions(1.0 - math.nextafter(p, -1.0), rank, min_rank, power) >= k:
            p = math.nextafter(p, -1.0)
        if k > starts[-1][0]:
            starts.append((k, min(p, 1.0)))
    return starts


def nested_bands(layer: TriLoRALayer, bounds: list[int]) -> TriLoRALayer:
    """The layer with each band [bounds[j-1], bounds[j]) of its directions in canonical SVD form
    on its own (U and Vt orthonormal within a band, s descending within it), bands in their
    order: for every bound k, the first k directions give exactly the delta that the first k
    directions of ``layer`` give, which a global canonical form does not keep. ``bounds``:
    ascending direction counts ending at the rank (e.g. the counts of ``band_starts``). Same
    dtype, alpha and rank (a rank-deficient band keeps its width, with zero s)."""
    if not bounds or bounds[-1] != layer.rank or any(b <= a for a, b in zip([0, *bounds], bounds, strict=False)):
        raise ValueError(f"band bounds must ascend from above 0 to the rank {layer.rank}, got {bounds}")
    parts = []
    for a, b in zip([0, *bounds], bounds, strict=False):
        block = TriLoRALayer(u=layer.u[:, a:b], s=layer.s[a:b], vt=layer.vt[a:b], alpha=float(b - a))
        c = canonicalize(block)
        pad = (b - a) - c.rank  # out or in below the band's width: zero directions keep the bounds
        parts.append((torch.nn.functional.pad(c.u, (0, pad)), torch.nn.functional.pad(c.s, (0, pad)),
                      torch.cat([c.vt, c.vt.new_zeros(pad, *c.vt.shape[1:])])))
    return TriLoRALayer(u=torch.cat([p[0] for p in parts], 1).contiguous(), s=torch.cat([p[1] for p in parts]),
                        vt=torch.cat([p[2] for p in parts]).contiguous(), alpha=layer.alpha)


# The file's record of the schedule it was trained with (JSON {"min_rank": int, "power": float}):
# its layers are then in per-band canonical form (``banded``) and a loader masks them by noise level.
TIMESTEP_RANK_KEY = "trilora_timestep_rank"


def schedule_metadata(min_rank: int, power: float = 1.0) -> dict[str, str]:
    """The metadata entry that records T-LoRA's schedule (empty for min_rank 0: off)."""
    return {TIMESTEP_RANK_KEY: json.dumps({"min_rank": int(min_rank), "power": float(power)})} if min_rank else {}


def read_schedule(metadata: dict[str, str] | None) -> tuple[int, float] | None:
    """(min_rank, power) recorded in a file's metadata, None where it has none. Raises ValueError
    naming the key when the entry is not the JSON ``schedule_metadata`` writes."""
    text = (metadata or {}).get(TIMESTEP_RANK_KEY)
    if text is None:
        return None
    try:
        value = json.loads(text)
        min_rank, power = int(value["min_rank"]), float(value["power"])
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError(f"metadata {TIMESTEP_RANK_KEY} must be JSON {{\"min_rank\": int, \"power\": float}}, "
                         f"got {text!r}") from err
    if min_rank < 1 or not power > 0:
        raise ValueError(f"metadata {TIMESTEP_RANK_KEY} needs min_rank >= 1 and power > 0, got {text!r}")
    return min_rank, power


def band_bounds(rank: int, min_rank: int, power: float = 1.0) -> list[int]:
    """The direction counts that end the schedule's bands (``nested_bands``' bounds)."""
    return [k for k, _ in band_starts(rank, min_rank, power) if k > 0]


def banded(layer: TriLoRALayer, min_rank: int, power: float = 1.0) -> TriLoRALayer:
    """The layer in the per-band canonical form of the schedule (min_rank, power)."""
    return nested_bands(layer, band_bounds(layer.rank, min_rank, power))
