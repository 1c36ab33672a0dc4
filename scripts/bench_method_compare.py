#!/usr/bin/env python
"""Compares two `make bench-method` results of TrainTriLoRA on the frontier: a mechanism's run
(`--ours ...`) against the defaults' run, on the same bases, ranks and seeds. Per base, rank,
seed and error space, at held-out levels 1/4, 1/2, 3/4 and all of the way from the base model's
error to the best level both reach, the least drift of the mechanism (over its learning rates)
over the least drift of the defaults, and its least gap growth minus theirs. Below 1 and below 0:
the mechanism is better at that fit.

    .venv/bin/python scripts/bench_method_compare.py bench_output/method/full-....json \
        bench_output/method/tlora-....json   # the defaults' results first (one or more), the mechanism's last
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: harness
from harness.method_frontier import SPACES, add_gaps, frontier_claim  # noqa: E402


def fmt(value, digits=3) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}" if abs(value) >= 10 ** -digits or value == 0 else f"{value:.1e}"


def side_curves(results: dict, side: str = "ours") -> dict:
    """{(base, rank, seed): [the side's curves, one per learning rate]} with gap growth added."""
    out = {}
    for p in results["pairs"]:
        if p.get("pictures"):  # the picture-level base has no eps or x0 figures
            continue
        start = p["runs"][0]["curve"]["0"]
        curves = [r["curve"] for r in p["runs"] if r["side"] == side]
        for c in curves:
            add_gaps(c, start)
        out[(p["base"], p["rank"], p["seed"])] = curves
    return out


def compare(base_results: dict, mech_results: dict, against: str = "ours") -> list[dict]:
    base, mech = side_curves(base_results, against), side_curves(mech_results)
    rows = []
    for key in sorted(set(base) & set(mech)):
        for space in SPACES:
            claim = frontier_claim(mech[key], base[key], space)
            for r in claim["rows"]:
                rows.append({"base": key[0], "rank": key[1], "seed": key[2], "space": space, **r,
                             "gap_diff": r["gap_ours"] - r["gap_lora"]})
    return rows


def summary(rows: list[dict]) -> list[str]:
    lines = ["| base | error | rank | runs | drift ratio mechanism / theirs: median [min-max] | cells below 1 | "
             "gap growth mechanism - theirs: median | cells gap no larger |", "|---|---|---|---|---|---|---|---|"]
    for base in sorted({r["base"] for r in rows}):
        for space in SPACES:
            for rank in sorted({r["rank"] for r in rows}):
                cell = [r for r in rows if (r["base"], r["space"], r["rank"]) == (base, space, rank)]
                ratios = [r["drift_ratio"] for r in cell if r["drift_ratio"] is not None]
                if not cell:
                    continue
                lines.append(f"| {base} | {space} | {rank} | {len({r['seed'] for r in cell})} | "
                             f"{fmt(statistics.median(ratios), 2)} [{fmt(min(ratios), 2)}-{fmt(max(ratios), 2)}] | "
                             f"{sum(x < 1 for x in ratios)}/{len(ratios)} | "
                             f"{fmt(statistics.median(r['gap_diff'] for r in cell), 4)} | "
                             f"{sum(r['gap_diff'] <= 0 for r in cell)}/{len(cell)} |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("defaults", nargs="+", help="results JSON of the defaults (make bench-method; several: "
                                                   "their pairs together, the first of each base, rank and seed)")
    parser.add_argument("mechanism", help="results JSON of the mechanism (--ours ...)")
    parser.add_argument("--against", choices=("ours", "lora"), default="ours",
                        help="compare with TrainTriLoRA at its defaults (ours) or LoRA on the same layers (lora)")
    opts = parser.parse_args(argv)
    mech = json.loads(Path(opts.mechanism).read_text())
    base = json.loads(Path(opts.defaults[0]).read_text())
    for path in opts.defaults[1:]:
        seen = {(p["base"], p["rank"], p["seed"]) for p in base["pairs"]}
        base["pairs"] += [p for p in json.loads(Path(path).read_text())["pairs"]
                          if (p["base"], p["rank"], p["seed"]) not in seen]
    them = "LoRA on the same layers" if opts.against == "lora" else base["ours_overrides"] or "the defaults"
    print(f"Mechanism: --ours {mech['ours_overrides']} ({mech['time']}) against {them} ({base['time']}); drift ratio "
          f"and gap difference: the mechanism's over / minus theirs.\n")
    print("\n".join(summary(compare(base, mech, opts.against))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
