"""Training that runs out of memory: a real allocation failure, in a process of its own.

oom_child.py caps its address space (RLIMIT_AS) 1 GiB above what the warmed-up ComfyUI uses and
trains on a latent whose third step needs far more; see there for the steps."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

HEADROOM_MIB = 1024
BIG_LATENT_SIDE = 256  # 2048 px: its attention alone needs several GiB on the tiny model


@pytest.fixture(scope="module")
def outcome(tmp_path_factory):
    root = tmp_path_factory.mktemp("oom")
    (root / "loras").mkdir()
    (root / "output").mkdir()
    # Few malloc arenas: each thread's arena reserves address space the cap would otherwise count.
    env = dict(os.environ, MALLOC_ARENA_MAX="2")
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("oom_child.py")), str(root / "loras"),
                           str(root / "output"), str(HEADROOM_MIB), str(BIG_LATENT_SIDE)],
                          capture_output=True, text=True, env=env, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"child failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def test_out_of_memory_names_the_step_and_saves_the_last_good_adapter(outcome):
    error = outcome["error"]
    assert error is not None, "the big latent did not run out of memory under the cap"
    assert error["mro"][:2] == ["TrainingOutOfMemoryError", "OutOfMemoryError"]  # ComfyUI then unloads models
    match = re.fullmatch(
        r"TrainTriLoRA: out of memory at step 3 of 6 on cpu \(.*can't allocate memory.*\)\. The memory of the "
        r"run was released\. To fit, turn gradient_checkpointing on, train in bf16 or use smaller latents or "
        r"a lower rank\. The adapter after step 2 was saved to (.+/oom/(run_\d{5}_step000002_last_good)"
        r"\.safetensors); choose it as existing_lora to go on from there\.", error["message"])
    assert match, error["message"]
    stem = match.group(2)
    # The optimizer state is kept too: the failure came before the update, so resuming is exact.
    assert outcome["files"] == [stem + ".optim", stem + ".safetensors"]


def test_out_of_memory_releases_the_memory_of_the_failed_step(outcome):
    # The failed step held most of the 1 GiB headroom when its last allocation failed.
    assert outcome["rss_growth_kib"] < HEADROOM_MIB * 1024 / 8, outcome["rss_growth_kib"]


def test_resuming_after_out_of_memory_equals_a_run_that_never_failed(outcome):
    assert outcome["steps"] == {"straight": 4, "resumed": 4}
    assert outcome["resumed_equals_straight"]
