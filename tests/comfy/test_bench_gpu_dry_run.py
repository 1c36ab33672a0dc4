"""`scripts/bench_gpu.py --dry-run`: the GPU run's code paths (model rows, the measured runs, the
CUDA checks: bf16, fp16 with its grad scaler, a real out-of-memory ending, resume exactness,
low-VRAM loading, a float8 base, the offloading input) on the tiny model on the CPU, so `make bench-gpu` is known to run before a GPU
is at hand."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(1800)  # a few minutes on a quiet machine; a shared one is slower
def test_gpu_bench_dry_run_passes_its_checks_and_writes_its_rows(tmp_path):
    # Rows 2 and 3 run the same tiny-model path as row 1 in a dry run: row 1 (bf16) and 4 (fp8).
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_gpu.py"), "--dry-run", "--rows", "1,4",
                           "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=1700)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "latest-gpu-dry-run.json").read_text())
    assert results["dry_run"] is True
    assert [r["label"] for r in results["rows"]] == ["SD1.5 512px", "Flux-dev 1024px fp8 weights"]
    assert [r["weights"] for r in results["rows"]] == ["bf16", "fp8"]
    for row in results["rows"]:
        assert "error" not in row, row
        assert row["it_s_ours"] > 0 and row["it_s_theirs"] > 0, row
        assert math.isfinite(row["memory_ratio"]) and row["peak_ours_bytes"] > 0, row
        assert abs(row["adapter_bytes"] / row["analytic_adapter_bytes"] - 1) <= 0.1, row
    checks = results["checks"]
    assert set(checks) == {"bf16 autocast", "fp16 with grad scaler", "out of memory", "resume exactness",
                           "low-VRAM loading", "float8 base", "offloading input"}
    assert all(c["passed"] for c in checks.values()), {k: c for k, c in checks.items() if not c["passed"]}
    assert "TrainingOutOfMemoryError" in checks["out of memory"]["mro"]
    assert len(checks["fp16 with grad scaler"]["grad_scaler_scales"]) == 3
    assert checks["resume exactness"]["max_abs_diff"] == 0.0
    assert checks["low-VRAM loading"]["max_abs_diff"] == 0.0  # on the CPU an offload moves no byte
    assert checks["float8 base"]["max_abs_diff"] == 0.0 and checks["float8 base"]["stored_untouched"]
    assert checks["offloading input"]["max_abs_diff"] == 0.0 and checks["offloading input"]["losses_equal"]
    assert (tmp_path / "latest-gpu-dry-run.md").read_text().count("| passed") == 7
