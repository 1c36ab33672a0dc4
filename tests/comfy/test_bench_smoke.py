"""`scripts/bench.py --quick` runs end to end (real ComfyUI, both trainers, both loaders, the
memory subprocesses) and writes a well-formed results JSON. Figures are not checked: a smoke run
on a shared machine measures nothing; `make bench` does."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_quick_writes_well_formed_results(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench.py"), "--quick", "--cpu-only",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "latest-quick.json").read_text())
    assert results["schema"] == 1 and results["quick"] is True
    assert {"cpu", "cores", "torch"} <= set(results["machine"])
    cpu = results["devices"]["cpu"]
    assert {"train", "load", "scaling"} <= set(cpu["timing"])
    names = {row["name"] for row in results["summary"]}
    assert {"train_step", "adapter_overhead", "load_patch_cold", "load_patch_warm", "train_memory",
            "step_vs_rank", "step_vs_latent", "overhead_vs_latent", "patch_vs_rank"} <= names
    for row in results["summary"]:
        assert row["pairs"] >= 1, row
        assert math.isfinite(row["ratio"]) and row["ratio"] > 0, row
        assert row["ours"] > 0 and row["theirs"] > 0, row
    assert (out / "latest-quick.md").read_text().count("\n| cpu |") == len(results["summary"])
    assert list(out.glob("bench-*-quick.json"))
