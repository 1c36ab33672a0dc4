"""The deciding figures of `make bench-method` (scripts/bench_method.py), pure: each side's curves
of measurements at checkpoints ({step: {"heldout_eps": ..., "drift_x0": ..., ...}}), the frontier
of drift (and gap growth) against held-out fit over a side's learning rates, the claim "ours drifts
<= 0.7x lora at every fit level with no larger gap", and the defaults' goals. No ComfyUI, no torch."""
from __future__ import annotations

from .picture_stats import FRAME_PRESENT

SPACES = ("eps", "x0")
SIDES = ("ours", "lora", "theirs")
FIT_FRACTIONS = (0.25, 0.5, 0.75, 1.0)  # of the way from the base model's held-out error to the common best
GOAL_DRIFT_RATIO = 0.7


def at_level(curve: dict, key: str, level: float, want: str):
    """`want` interpolated (linearly, between checkpoints) where `key` first falls to `level`
    along the curve; None if it never does."""
    pts = [curve[s] for s in sorted(curve, key=int)]
    if pts[0][key] <= level:
        return pts[0][want]
    for a, b in zip(pts, pts[1:], strict=False):
        if b[key] <= level:
            t = (a[key] - level) / (a[key] - b[key])
            return a[want] + t * (b[want] - a[want])
    return None


def add_gaps(curve: dict, start: dict, spaces=SPACES) -> None:
    """gap_<space>: generalisation-gap growth, (held-out - train) now minus the base model's."""
    for p in curve.values():
        for space in spaces:
            p[f"gap_{space}"] = (p[f"heldout_{space}"] - p[f"train_{space}"]) - \
                (start[f"heldout_{space}"] - start[f"train_{space}"])


def frontier(curves: list[dict], space: str, level: float, want: str):
    """The least `want` (drift or gap) with which any of a side's curves reaches held-out `level`."""
    values = [v for c in curves if (v := at_level(c, f"heldout_{space}", level, f"{want}_{space}")) is not None]
    return min(values) if values else None


def frontier_claim(ours: list[dict], lora: list[dict], space: str) -> dict:
    """Ours against lora on the frontier: at held-out levels FIT_FRACTIONS of the way from the
    base model's error to the best level both sides reach, the ratio of least drifts and the
    difference of least gaps. No level (empty rows) where a side never improves on the base."""
    key = f"heldout_{space}"
    start = ours[0]["0"][key]
    common = max(min(p[key] for c in side for p in c.values()) for side in (ours, lora))
    rows = []
    if common < start:
        for f in FIT_FRACTIONS:
            # all of the way is `common` itself: start - (start - common) can round below it, where
            # the side whose best it is would never "reach" it
            level = common if f == 1 else start - f * (start - common)
            d_o, d_l = frontier(ours, space, level, "drift"), frontier(lora, space, level, "drift")
            g_o, g_l = frontier(ours, space, level, "gap"), frontier(lora, space, level, "gap")
            rows.append({"fraction": f, "level": level, "drift_ours": d_o, "drift_lora": d_l,
                         "drift_ratio": d_o / d_l if d_l and d_o is not None else None, "gap_ours": g_o, "gap_lora": g_l})
    ok = bool(rows) and all(r["drift_ratio"] is not None and r["drift_ratio"] <= GOAL_DRIFT_RATIO
                            and r["gap_ours"] <= r["gap_lora"] for r in rows)
    return {"start": start, "common_best": common, "rows": rows, "holds": ok,
            "drift_holds": bool(rows) and all(r["drift_ratio"] is not None and r["drift_ratio"] <= GOAL_DRIFT_RATIO
                                              for r in rows),
            "gap_holds": bool(rows) and all(r["gap_ours"] <= r["gap_lora"] for r in rows)}


def defaults_goals(default: dict, lora: list[dict], theirs: dict) -> dict:
    """The goals of the defaults' run (issue 24, issue 19), eps fit unless named x0."""
    cd, ct = default, theirs
    last = str(max(int(s) for s in cd))
    start = cd["0"]
    h_ours = cd[last]["heldout_eps"]
    lora_best = min(p["heldout_eps"] for c in lora for p in c.values())
    level = max(h_ours, lora_best)  # where both get: ours' last fit, or lora's best if it never gets there
    drift_ours_at = at_level(cd, "heldout_eps", level, "drift_eps")
    drift_lora_at = frontier(lora, "eps", level, "drift")
    h_theirs = ct[last]["heldout_eps"]
    drift19 = at_level(cd, "heldout_eps", h_theirs, "drift_eps")
    g = {
        "heldout_x0_max": max(p["heldout_x0"] for p in cd.values()), "heldout_x0_base": start["heldout_x0"],
        "heldout_x0_last": cd[last]["heldout_x0"], "heldout_x0_theirs": ct[last]["heldout_x0"],
        "heldout_eps_last": h_ours, "heldout_eps_theirs": h_theirs, "heldout_eps_lora_best": lora_best,
        "drift_ratio_vs_lora": None if not drift_lora_at or drift_ours_at is None else drift_ours_at / drift_lora_at,
        "drift_ratio_vs_theirs": None if drift19 is None else drift19 / ct[last]["drift_eps"],
        "gap_ours": cd[last]["gap_eps"], "gap_theirs": ct[last]["gap_eps"],
    }
    g["x0_never_above_base"] = g["heldout_x0_max"] <= g["heldout_x0_base"]
    g["x0_no_worse_than_theirs"] = g["heldout_x0_last"] <= g["heldout_x0_theirs"]
    g["drift_vs_lora"] = g["drift_ratio_vs_lora"] is not None and g["drift_ratio_vs_lora"] <= GOAL_DRIFT_RATIO
    g["issue19"] = (drift19 is not None and g["drift_ratio_vs_theirs"] <= GOAL_DRIFT_RATIO
                    and g["gap_ours"] <= g["gap_theirs"])
    g["all"] = all(g[k] for k in ("x0_never_above_base", "x0_no_worse_than_theirs", "drift_vs_lora", "issue19"))
    return g


def decide(runs: list[dict], default_lr: float) -> dict:
    """The figures of one base, rank and seed from its runs (every side and learning rate)."""
    start = runs[0]["curve"]["0"]
    for r in runs:
        add_gaps(r["curve"], start)
    side = {s: [r["curve"] for r in runs if r["side"] == s] for s in SIDES}
    default = next(r["curve"] for r in runs if r["side"] == "ours" and r["lr"] == default_lr)
    return {"frontier": {space: frontier_claim(side["ours"], side["lora"], space) for space in SPACES},
            "defaults": defaults_goals(default, side["lora"], side["theirs"][0])}


# Pictures (the drawing model): "pic" is the space whose held-out error is the distance of the
# held-out prompts' frame contrast from the sample style's, and whose drift is the change of the
# base prompts' pictures in pixels (harness/bench_pictures.py).
PICTURE_SPACE = "pic"


def picture_goals(default: dict, lora: list[dict]) -> dict:
    """The defaults' goals on pictures: the frame visible on held-out prompts at the last step,
    and drift at the defaults' best style fit <= GOAL_DRIFT_RATIO x LoRA's least there."""
    last = str(max(int(s) for s in default))
    best_ours = min(p["heldout_pic"] for p in default.values())
    best_lora = min(p["heldout_pic"] for c in lora for p in c.values())
    level = max(best_ours, best_lora)
    d_ours, d_lora = at_level(default, "heldout_pic", level, "drift_pic"), frontier(lora, PICTURE_SPACE, level, "drift")
    g = {"frame_last": default[last]["heldout_frame"], "fit_best": best_ours, "fit_lora_best": best_lora,
         "content_last": default[last]["content_pic"], "content_base": default["0"]["content_pic"],
         "drift_ratio_vs_lora": None if not d_lora or d_ours is None else d_ours / d_lora}
    g["frame_visible"] = g["frame_last"] < FRAME_PRESENT
    g["drift_vs_lora"] = g["drift_ratio_vs_lora"] is not None and g["drift_ratio_vs_lora"] <= GOAL_DRIFT_RATIO
    g["all"] = g["frame_visible"] and g["drift_vs_lora"]
    return g


def decide_pictures(runs: list[dict], default_lr: float) -> dict:
    """decide() for the picture-level base: the frontier claim in the picture space and picture_goals."""
    start = runs[0]["curve"]["0"]
    for r in runs:
        add_gaps(r["curve"], start, (PICTURE_SPACE,))
    ours = [r["curve"] for r in runs if r["side"] == "ours"]
    lora = [r["curve"] for r in runs if r["side"] == "lora"]
    default = next(r["curve"] for r in runs if r["side"] == "ours" and r["lr"] == default_lr)
    return {"frontier": {PICTURE_SPACE: frontier_claim(ours, lora, PICTURE_SPACE)},
            "defaults": picture_goals(default, lora)}
