"""`scripts/bench.py --quick` runs end to end (real ComfyUI, both trainers, both loaders, the
memory subprocesses, the full-size section's code on the tiny model) and writes a well-formed
results JSON. Timings are not checked: a smoke run on a shared machine measures nothing; `make
bench` does. Only the adapter's memory, which is exact, is."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(1800)  # a few minutes on a quiet machine; a shared one is slower
def test_bench_quick_writes_well_formed_results(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench.py"), "--quick", "--cpu-only",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=1700)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "latest-quick.json").read_text())
    assert results["schema"] == 1 and results["quick"] is True
    assert {"cpu", "cores", "torch"} <= set(results["machine"])
    cpu = results["devices"]["cpu"]
    assert {"train", "load", "scaling", "bases", "data"} <= set(cpu["timing"])
    names = {row["name"] for row in results["summary"]}
    assert {"train_step", "adapter_overhead", "load_patch_cold", "load_patch_warm", "train_memory",
            "step_vs_rank", "step_vs_latent", "overhead_vs_latent", "patch_vs_rank",
            "full_step", "full_memory", "full_adapter", "executor_step", "executor_memory",
            "full_scale_step", "full_scale_memory", "bases_step", "bases_memory", "cache_read", "cache_written",
            "te_step"} <= names
    # section 7: every base against the plain run, and ours against TrainLoraNode on the plain and float8 bases
    bases = {(row["variant"], row["reference"]) for row in cpu["timing"]["bases"]["rows"]}
    assert {("fp8", "plain"), ("offloading", "plain"), ("fp8+offloading", "plain"), ("theirs fp8", "theirs plain"),
            ("plain", "theirs plain"), ("fp8", "theirs fp8")} <= bases, bases
    # the full-size section's code path on the tiny model: the adapter's memory is its analytic size
    adapter = next(row for row in results["summary"] if row["name"] == "full_adapter")
    assert abs(adapter["ratio"] - 1) <= 0.1, adapter
    for row in results["summary"]:
        assert row["pairs"] >= 1, row
        assert math.isfinite(row["ratio"]) and row["ratio"] > 0, row
        assert row["ours"] > 0 and row["theirs"] > 0, row
    assert (out / "latest-quick.md").read_text().count("\n| cpu |") == len(results["summary"])
    assert list(out.glob("bench-*-quick.json"))


@pytest.mark.timeout(900)
def test_bench_monitor_quick_writes_every_side(tmp_path):
    # scripts/bench_monitor.py end to end on a few steps (the intervals scaled to them): every side
    # runs and is reported; the figures themselves are make bench's.
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_monitor.py"), "--quick", "--steps", "4",
                           "--latent", "8", "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=850)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "monitor-latest-quick.json").read_text())
    assert set(result["overhead"]) == {"drift", "held-out", "preview", "all"}
    assert result["intervals"] == {"validate_every": 2, "preview_every": 2}
    assert all(math.isfinite(v["median"]) for v in result["overhead"].values())
    assert "| all |" in (out / "monitor-latest-quick.md").read_text()
