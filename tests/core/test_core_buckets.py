"""Aspect-ratio buckets (trilora_core/buckets.py): kohya sd-scripts' bucket table and choice, and
a seeded batch stream in which each batch comes from one bucket."""
from __future__ import annotations

import pytest

from trilora_core import buckets, training


def test_the_bucket_table_is_kohyas_for_512():
    table = buckets.bucket_resolutions(512, 256, 1024)
    # kohya's make_bucket_resolutions((512, 512), 256, 1024, 64): area <= 512^2, sides in 64s.
    widths = {(256, 1024), (320, 768), (384, 640), (448, 576), (512, 512), (576, 448), (640, 384), (704, 320),
              (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256)}
    assert table == sorted(widths | {(h, w) for w, h in widths})
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 for w, h in table)
    assert buckets.bucket_limits(512) == (256, 1024)


@pytest.mark.parametrize("size", [128, 512, 1024])
def test_every_bucket_has_the_area_at_most_and_both_orientations(size):
    table = buckets.bucket_resolutions(size, *buckets.bucket_limits(size))
    assert (size, size) in table
    for w, h in table:
        assert w * h <= size * size and (h, w) in table and w % 64 == 0 and h % 64 == 0


def test_upscale_picks_the_nearest_aspect_and_covers_the_bucket():
    # 1200 x 800 (3:2) at 512: kohya's nearest bucket is 640 x 384 (1.67) or 576 x 448 (1.29): 1.5 is nearer 1.67.
    bucket, resized = buckets.select_bucket(1200, 800, 512, upscale=True)
    assert bucket == (640, 384)
    assert resized == (640, 427) and resized[0] >= bucket[0] and resized[1] >= bucket[1]
    # A small picture is enlarged to its bucket.
    assert buckets.select_bucket(100, 100, 512, upscale=True) == ((512, 512), (512, 512))


def test_no_upscale_keeps_small_pictures_at_their_own_size_rounded_down():
    assert buckets.select_bucket(300, 200, 512) == ((256, 192), (300, 200))
    assert buckets.select_bucket(512, 512, 512) == ((512, 512), (512, 512))
    # Larger than the area: scaled down to it, keeping the aspect (kohya's rounding), then cropped.
    bucket, resized = buckets.select_bucket(2000, 1000, 512)
    assert resized == (640, 320) and bucket == (640, 320)  # 768 x 384 would exceed the area
    bucket, resized = buckets.select_bucket(1000, 750, 512)
    assert bucket[0] * bucket[1] <= 512 * 512 and resized[0] >= bucket[0] and resized[1] >= bucket[1]
    assert abs(resized[0] / resized[1] - 4 / 3) < 0.02


def test_a_picture_under_the_smallest_bucket_is_refused_without_upscale():
    with pytest.raises(ValueError, match=r"40 x 300 px is smaller than the smallest bucket \(64 px a side\)"):
        buckets.select_bucket(40, 300, 512)
    assert buckets.select_bucket(40, 300, 512, upscale=True)[0][0] >= 64  # with upscale it is enlarged
    with pytest.raises(ValueError, match="narrower than the smallest bucket"):
        buckets.select_bucket(20000, 70, 256)


def test_group_buckets_is_independent_of_input_order():
    assert buckets.group_buckets(["b", "a", "b", "a", "c"]) == [[1, 3], [0, 2], [4]]
    assert buckets.group_buckets([(1, 4, 8, 12), (1, 4, 8, 8), (1, 4, 8, 8)]) == [[1, 2], [0]]


def test_every_batch_comes_from_one_bucket_and_every_item_once_per_epoch():
    groups = [[0, 2, 4, 6, 8], [1, 3], [5], [7, 9, 10]]
    per_epoch = 3 + 1 + 1 + 2  # ceil(len / 2) batches per bucket
    stream = [buckets.bucket_batch(11, groups, 2, n) for n in range(3 * per_epoch)]
    for batch in stream:
        assert any(set(batch) <= set(g) for g in groups) and 1 <= len(batch) <= 2
    for epoch in range(3):
        seen = sorted(i for b in stream[epoch * per_epoch:(epoch + 1) * per_epoch] for i in b)
        assert seen == list(range(11))
    assert [5] in stream[:per_epoch]  # the one-picture bucket trains as a batch of one, as kohya's does
    assert stream[:per_epoch] != stream[per_epoch:2 * per_epoch]  # a fresh order each epoch
    # Resume-exact: batch n is the same whatever came before it.
    assert [buckets.bucket_batch(11, groups, 2, n) for n in (9, 4, 17)] == [stream[9], stream[4], stream[17]]
    assert [buckets.bucket_batch(12, groups, 2, n) for n in range(per_epoch)] != stream[:per_epoch]


def test_one_bucket_is_the_stream_of_a_run_without_buckets():
    items = list(range(7))
    for batch_size in (1, 3, 7, 9):
        count = min(batch_size, 7)
        got = [i for n in range(5) for i in buckets.bucket_batch(5, [items], batch_size, n)]
        assert got == training.sample_indices(5, 7, 0, 5 * count)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        buckets.bucket_batch(1, [[0], []], 2, 0)
    with pytest.raises(ValueError):
        buckets.bucket_resolutions(512, 32, 1024)
