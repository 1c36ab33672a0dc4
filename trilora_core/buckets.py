"""Aspect-ratio buckets, as kohya sd-scripts' BucketManager makes them (library/train_util.py):
which size each picture trains at, and a seeded stream of batches that each come from one bucket.

Sizes are (width, height) in pixels. A bucket's sides are multiples of ``step`` (64) and its
area is at most ``size`` x ``size``.

- **Upscale on** (kohya's default): the predefined buckets of ``bucket_resolutions``; a picture
  takes the bucket nearest its aspect ratio, is scaled (up or down) until it covers the bucket and
  is centre-cropped to it.
- **Upscale off** (kohya's ``--bucket_no_upscale``): a picture larger than the area is scaled
  down to it, keeping its aspect; its bucket is that size rounded down to ``step`` (cropped, never
  enlarged), so a small picture trains at its own size. A picture with a side under one ``step``
  has no bucket: ``select_bucket`` raises (kohya would enlarge it to ``step`` silently).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import torch

from .training import generator, sample_indices

STEP = 64


def bucket_resolutions(size: int, min_side: int, max_side: int, step: int = STEP) -> list[tuple[int, int]]:
    """kohya's predefined buckets for a ``size`` x ``size`` area: the square, and for each width
    from ``min_side`` to ``max_side`` in ``step``s the tallest height within the area (at most
    ``max_side``, at least ``min_side``), both ways round. Sorted (width, height)."""
    if step < 1 or size < step or min_side < step or max_side < min_side:
        raise ValueError(f"bucket_resolutions: need step <= min_side <= max_side and size >= step, got size {size}, "
                         f"min_side {min_side}, max_side {max_side}, step {step}")
    area = size * size
    side = int(math.sqrt(area) // step) * step
    resos = {(side, side)}
    for width in range(min_side, max_side + 1, step):
        height = min(max_side, int((area // width) // step) * step)
        if height >= min_side:
            resos.update({(width, height), (height, width)})
    return sorted(resos)


def bucket_limits(size: int, step: int = STEP) -> tuple[int, int]:
    """(min_side, max_side) of the predefined buckets for ``size``: kohya's defaults for 512 (256,
    1024), scaled with the size: half and twice ``size``, rounded to ``step``, at least one step."""
    return max(step, size // 2 // step * step), max(step, 2 * size // step * step)


def _round_to_steps(x: float, step: int) -> int:
    x = int(x + 0.5)
    return x - x % step


def _downscaled(width: int, height: int, area: int, step: int) -> tuple[int, int]:
    """A picture larger than ``area`` scaled down to it, keeping its aspect, rounded as kohya does:
    the side whose step-rounding keeps the aspect best decides."""
    aspect = width / height
    if width * height <= area:
        return width, height
    resized_w = math.sqrt(area * aspect)
    resized_h = area / resized_w
    w_rounded = _round_to_steps(resized_w, step)
    h_in_w = max(step, _round_to_steps(w_rounded / aspect, step))
    h_rounded = _round_to_steps(resized_h, step)
    w_in_h = max(step, _round_to_steps(h_rounded * aspect, step))
    if abs(w_rounded / h_in_w - aspect) < abs(w_in_h / max(h_rounded, 1) - aspect):
        return w_rounded, int(w_rounded / aspect + 0.5)
    return int(h_rounded * aspect + 0.5), h_rounded


def select_bucket(width: int, height: int, size: int, upscale: bool = False,
                  step: int = STEP) -> tuple[tuple[int, int], tuple[int, int]]:
    """(bucket, resized): the bucket a ``width`` x ``height`` picture trains at and the size it is
    scaled to before a centre crop to the bucket (resized covers the bucket). Raises ValueError when
    upscale is off and a side of the picture is under ``step`` pixels (no bucket holds it)."""
    if width < 1 or height < 1:
        raise ValueError(f"select_bucket: a picture of {width} x {height} px")
    aspect = width / height
    if upscale:
        buckets = bucket_resolutions(size, *bucket_limits(size, step), step)
        bucket = (width, height) if (width, height) in buckets else \
            min(buckets, key=lambda b: abs(b[0] / b[1] - aspect))
        scale = bucket[1] / height if aspect > bucket[0] / bucket[1] else bucket[0] / width
        resized = (max(bucket[0], int(width * scale + 0.5)), max(bucket[1], int(height * scale + 0.5)))
        return bucket, resized
    if min(width, height) < step:
        raise ValueError(f"a picture of {width} x {height} px is smaller than the smallest bucket ({step} px a side)")
    resized = _downscaled(width, height, size * size, step)
    if min(resized) < step:
        raise ValueError(f"a picture of {width} x {height} px is {resized[0]} x {resized[1]} px within the area of "
                         f"{size} x {size}: narrower than the smallest bucket ({step} px a side)")
    bucket = (max(step, resized[0] - resized[0] % step), max(step, resized[1] - resized[1] % step))
    return bucket, (max(resized[0], bucket[0]), max(resized[1], bucket[1]))


def group_buckets(keys: Sequence[Hashable]) -> list[list[int]]:
    """The items of each bucket (items with equal keys, e.g. latent shapes), in input order; the
    buckets sorted by key, so the same pictures in another order (ComfyUI's Resolution Bucket
    output) make the same buckets."""
    groups: dict = {}
    for item, key in enumerate(keys):
        groups.setdefault(key, []).append(item)
    return [groups[key] for key in sorted(groups)]


def _epoch_batches(seed: int, buckets: list[list[int]], batch_size: int, epoch: int) -> list[list[int]]:
    """One epoch as kohya draws it: each bucket in a fresh seeded order, cut into batches of
    ``batch_size`` (a bucket's last batch may be smaller), the batches in a seeded order."""
    batches = []
    for b, items in enumerate(buckets):
        order = torch.randperm(len(items), generator=generator(seed, "bucket", epoch, b)).tolist()
        batches.extend([items[i] for i in order[start:start + batch_size]] for start in range(0, len(items), batch_size))
    shuffle = torch.randperm(len(batches), generator=generator(seed, "batches", epoch)).tolist()
    return [batches[i] for i in shuffle]


def bucket_batch(seed: int, buckets: list[list[int]], batch_size: int, number: int) -> list[int]:
    """Batch ``number`` (0, 1, ...) of an endless seeded stream in which every batch comes from
    one bucket and every item comes once per epoch. It depends only on (seed, buckets, batch_size,
    number), so a resumed run draws what an uninterrupted one would. With one bucket it is
    ``sample_indices``' stream, cut into batches (the stream of a run without buckets)."""
    if not buckets or not all(buckets) or batch_size < 1 or number < 0:
        raise ValueError("bucket_batch: need non-empty buckets, batch_size >= 1 and number >= 0")
    if len(buckets) == 1:
        items = buckets[0]
        count = min(batch_size, len(items))
        return [items[i] for i in sample_indices(seed, len(items), number * count, count)]
    per_epoch = sum(-(-len(items) // batch_size) for items in buckets)
    epoch, offset = divmod(number, per_epoch)
    return _epoch_batches(seed, buckets, batch_size, epoch)[offset]
