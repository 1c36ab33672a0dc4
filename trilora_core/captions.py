"""Captions as a text-encoder run sees them each step, as kohya sd-scripts makes them
(``--caption_dropout_rate``, ``--shuffle_caption``, ``--keep_tokens``): the whole caption dropped to
the empty one at a rate, else its comma-separated tags shuffled with the first ``keep_tokens`` kept
in place. Seeded: the same generator state gives the same caption."""
from __future__ import annotations

import torch


def step_caption(caption: str, gen: torch.Generator, dropout_rate: float = 0.0, shuffle: bool = False,
                 keep_tokens: int = 0) -> str:
    """The caption one image trains with at one step.

    caption: the image's caption. gen: a CPU generator (one draw for the dropout when
    ``dropout_rate`` > 0, one permutation when ``shuffle``), so a step's captions follow from the
    run's seed. dropout_rate in [0, 1]: the chance of the empty caption (kohya's
    caption_dropout_rate, which also drops the kept tokens). shuffle: shuffle the tags (split at
    ",", stripped, joined with ", " as kohya joins them); the first ``keep_tokens`` tags stay first
    and in order. Without dropout or shuffle the caption is returned unchanged. Raises ValueError
    for a rate outside [0, 1] or a negative keep_tokens."""
    if not 0.0 <= dropout_rate <= 1.0:
        raise ValueError(f"caption_dropout_rate must be between 0 and 1, got {dropout_rate}")
    if keep_tokens < 0:
        raise ValueError(f"keep_tokens must not be negative, got {keep_tokens}")
    if dropout_rate > 0 and float(torch.rand((), generator=gen)) < dropout_rate:
        return ""
    if not shuffle:
        return caption
    tags = [t.strip() for t in caption.strip().split(",")]
    fixed, flex = tags[:keep_tokens], tags[keep_tokens:]
    order = torch.randperm(len(flex), generator=gen).tolist()
    return ", ".join(fixed + [flex[i] for i in order])
