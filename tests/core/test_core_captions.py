"""Caption dropout, shuffle and keep_tokens as kohya sd-scripts apply them (trilora_core.captions)."""
from __future__ import annotations

import pytest
import torch

from trilora_core import step_caption

CAPTION = "trlstyle, a red circle, thick black frame, flat colours, white background"


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_without_dropout_or_shuffle_the_caption_is_unchanged_and_draws_nothing():
    gen = _gen()
    state = gen.get_state()
    assert step_caption(CAPTION, gen) == CAPTION
    assert step_caption(CAPTION, gen, keep_tokens=2) == CAPTION
    assert torch.equal(gen.get_state(), state)


def test_shuffle_keeps_the_first_keep_tokens_in_place_and_permutes_the_rest():
    tags = [t.strip() for t in CAPTION.split(",")]
    seen = set()
    for seed in range(40):
        out = step_caption(CAPTION, _gen(seed), shuffle=True, keep_tokens=1)
        got = out.split(", ")
        assert got[0] == "trlstyle" and sorted(got[1:]) == sorted(tags[1:])
        seen.add(tuple(got[1:]))
    assert len(seen) > 10  # 24 orders of 4 tags: the shuffle really shuffles
    two = step_caption(CAPTION, _gen(3), shuffle=True, keep_tokens=2).split(", ")
    assert two[:2] == tags[:2]
    assert step_caption(CAPTION, _gen(5), shuffle=True, keep_tokens=10) == ", ".join(tags)


def test_the_same_seed_gives_the_same_caption():
    outs = {step_caption(CAPTION, _gen(7), 0.3, True, 1) for _ in range(5)}
    assert len(outs) == 1
    assert len({step_caption(CAPTION, _gen(s), 0.0, True, 0) for s in range(10)}) > 1


def test_dropout_gives_the_empty_caption_at_its_rate_kept_tokens_included():
    gen = _gen(11)
    outs = [step_caption(CAPTION, gen, 0.25, True, 1) for _ in range(4000)]
    dropped = sum(o == "" for o in outs) / len(outs)
    assert abs(dropped - 0.25) < 0.03
    assert all(o.startswith("trlstyle, ") for o in outs if o)
    assert step_caption(CAPTION, _gen(), 1.0) == ""


@pytest.mark.parametrize("kw, name", [({"dropout_rate": 1.5}, "caption_dropout_rate"),
                                      ({"dropout_rate": -0.1}, "caption_dropout_rate"),
                                      ({"keep_tokens": -1}, "keep_tokens")])
def test_bad_settings_are_named(kw, name):
    with pytest.raises(ValueError, match=name):
        step_caption(CAPTION, _gen(), **kw)
