"""The deciding figures of `make bench-method` (harness/method_frontier.py) on hand-made curves:
linear interpolation between checkpoints, the least drift over a side's learning rates, the
common fit range and the claim's verdicts."""
from __future__ import annotations

import pytest

from harness.method_frontier import add_gaps, at_level, frontier, frontier_claim


def curve(points, drift_scale=1.0, gap=0.0):
    """{step: figures} from (step, held-out, drift) triples; the same in eps and x0; train error
    held-out - gap (so the gap growth is gap, minus the base's)."""
    out = {}
    for step, heldout, drift in points:
        out[str(step)] = {f"{k}_{s}": v for s in ("eps", "x0") for k, v in
                          (("heldout", heldout), ("train", heldout - gap * step / 20), ("drift", drift * drift_scale))}
    add_gaps(out, out["0"])
    return out


SLOW = [(0, 1.0, 0.0), (10, 0.5, 0.2), (20, 0.3, 0.3)]


def test_at_level_interpolates_between_checkpoints_and_says_none_beyond_reach():
    c = curve(SLOW)
    assert at_level(c, "heldout_eps", 1.0, "drift_eps") == 0.0  # the base model itself
    assert at_level(c, "heldout_eps", 0.75, "drift_eps") == pytest.approx(0.1)
    assert at_level(c, "heldout_eps", 0.4, "drift_eps") == pytest.approx(0.25)
    assert at_level(c, "heldout_eps", 0.2, "drift_eps") is None


def test_frontier_takes_the_least_drift_over_the_learning_rates():
    cheap, costly = curve(SLOW, 0.5), curve(SLOW, 2.0)
    assert frontier([costly, cheap], "eps", 0.5, "drift") == pytest.approx(0.1)
    assert frontier([curve([(0, 1.0, 0.0), (20, 0.9, 0.1)])], "eps", 0.5, "drift") is None


def test_the_claim_at_every_level_of_the_common_range():
    ours = [curve(SLOW, 0.5)]
    lora = [curve([(0, 1.0, 0.0), (10, 0.6, 0.2), (20, 0.4, 0.4)])]  # reaches 0.4 at best
    claim = frontier_claim(ours, lora, "eps")
    assert claim["common_best"] == pytest.approx(0.4)  # the best level both reach
    assert [r["level"] for r in claim["rows"]] == pytest.approx([0.85, 0.7, 0.55, 0.4])
    assert all(r["drift_ratio"] < 0.7 for r in claim["rows"])
    assert claim["drift_holds"] and claim["gap_holds"] and claim["holds"]
    # the same drift, a larger gap: the drift half holds, the claim does not
    wider = frontier_claim([curve(SLOW, 0.5, gap=0.1)], lora, "x0")
    assert wider["drift_holds"] and not wider["gap_holds"] and not wider["holds"]
    # ours drifting as much as lora at one level is enough to fail
    assert not frontier_claim([curve(SLOW, 2.0)], lora, "eps")["drift_holds"]


def test_no_claim_where_a_side_never_improves_on_the_base():
    flat = [curve([(0, 1.0, 0.0), (20, 1.1, 0.3)])]
    claim = frontier_claim([curve(SLOW)], flat, "eps")
    assert claim["rows"] == [] and not claim["holds"]


def test_the_last_level_is_the_common_best_itself_not_a_rounded_neighbour():
    # 0.2784 - 1.0 * (0.2784 - 0.0409...) rounds below 0.0409...: ours, whose best that is, must
    # still reach it (found by the picture base's first run: a crash on None / float)
    best = 0.04085290591915443
    ours = [curve([(0, 0.2784, 0.0), (50, best, 0.02), (100, 0.06, 0.03)])]
    lora = [curve([(0, 0.2784, 0.0), (50, 0.03, 0.05), (100, 0.001, 0.06)])]
    assert 0.2784 - (0.2784 - best) != best  # the rounding this guards against
    claim = frontier_claim(ours, lora, "eps")
    assert claim["common_best"] == best and claim["rows"][-1]["level"] == best
    assert claim["rows"][-1]["drift_ours"] == pytest.approx(0.02)
    assert all(r["drift_ratio"] is not None for r in claim["rows"])
