"""`scripts/bench_method.py --quick` runs end to end (a pretrained base model, both trainers in
the real ComfyUI, measurements at the checkpoints) and writes well-formed results. Figures are
not judged: a few steps on a tiny model decide nothing; `make bench-method` does."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
METRICS = {"train_eps", "heldout_eps", "drift_eps", "train_x0", "heldout_x0", "drift_x0"}


def test_bench_method_quick_writes_well_formed_results(tmp_path):
    out = tmp_path / "method"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_method.py"), "--quick", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "latest-quick.json").read_text())
    assert results["schema"] == 1 and results["quick"] is True
    cfg = results["config"]
    assert [(p["rank"], p["seed"]) for p in results["pairs"]] == [(r, s) for r in cfg["ranks"] for s in cfg["seeds"]]
    for pair in results["pairs"]:
        for side in ("ours", "theirs"):
            curve = pair[side]["curve"]
            assert [int(s) for s in curve] == [0, *cfg["checkpoints"]]
            assert curve["0"]["drift_eps"] == 0 and curve["0"]["drift_x0"] == 0  # the base model itself
            for point in curve.values():
                assert METRICS <= set(point) and all(math.isfinite(point[k]) for k in METRICS), point
            last = curve[str(cfg["steps"])]
            assert last["drift_eps"] > 0, f"{side} did not change the model: {last}"  # both really trained
        for space in ("eps", "x0"):
            assert {"drift_ratio_at_matched_heldout", "gap_at_matched_train_ours", "goal"} <= set(pair["decide"][space])
    # the pretrained base model is cached for the next run
    assert list(out.glob("base-*.safetensors"))
    assert (out / "latest-quick.md").read_text().count("| TrainTriLoRA |") == len(cfg["ranks"]) * (1 + len(cfg["checkpoints"]))
