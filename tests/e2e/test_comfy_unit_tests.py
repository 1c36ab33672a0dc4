"""ComfyUI's own unit tests (its tests-unit/) give the same outcome for every test with the pack
loaded into ComfyUI as without it: scripts/comfy_unit_tests.py runs them both ways."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import COMFY, REPO


def test_the_pack_changes_no_result_of_comfyuis_unit_tests(tmp_path):
    out = tmp_path / "comparison.json"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "comfy_unit_tests.py"), "--comfyui", str(COMFY),
                           "--json", str(out)], capture_output=True, text=True, timeout=600)  # fmt: skip
    print(proc.stdout)
    result = json.loads(out.read_text())
    assert proc.returncode == 0 and result["identical"], proc.stdout + proc.stderr[-3000:]
    assert result["differences"] == {}
    assert result["baseline"] == result["pack"]
    # The pack really was in ComfyUI for the second run: its nodes and its weight adapter.
    assert {"TriLoRALoader", "TriLoRALoaderModelOnly"} <= set(result["pack_loaded"]["nodes"])
    assert "trilora" in result["pack_loaded"]["adapters"]
    # A real run, not an empty one: most of ComfyUI's suite, and only the listed tests left out.
    assert result["tests"] >= 200 and result["baseline"].get("passed", 0) >= 200, result["baseline"]
    assert all(reason for reason in result["excluded"].values())
    assert not set(result["excluded"]) & set(result["not_passed"])
