"""Training that runs out of memory on a real server: ComfyUI reports it as an OOM (and unloads
its models, as it does for its own), and the same server, under the same memory cap, trains the
next graph. A server of its own: its address space is capped (RLIMIT_AS, set from outside with
prlimit) 1 GiB above what it uses once warmed up."""
from __future__ import annotations

import re
import resource
from pathlib import Path

import pytest
from conftest import TINY

from harness.server import start_server

HEADROOM = 2**30


def train_prompt(size: int, prefix: str) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TINY}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a red cube"}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "4": {"class_type": "TrainTriLoRA", "inputs": {
            "model": ["1", 0], "latents": ["3", 0], "positive": ["2", 0], "steps": 2, "rank": 4, "alpha": 4.0,
            "batch_size": 1,
            "learning_rate": 0.001, "seed": 0, "training_dtype": "fp32", "gradient_checkpointing": False,
            "checkpoint_prefix": f"{prefix}/checkpoint"}},
        "5": {"class_type": "SaveTriLoRA", "inputs": {"trilora": ["4", 1], "filename_prefix": prefix}},
    }


def vm_size(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise KeyError("VmSize")


@pytest.fixture(scope="module")
def capped(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("oom_server"), cpu=True)
    try:
        warm = srv.run(train_prompt(64, "warmup"))  # model loaded, torch's threads started
        assert warm["status"]["status_str"] == "success", warm["status"]
        resource.prlimit(srv.proc.pid, resource.RLIMIT_AS, (vm_size(srv.proc.pid) + HEADROOM, resource.RLIM_INFINITY))
        yield srv
    finally:
        srv.stop()


def test_out_of_memory_is_reported_as_comfyuis_oom_and_the_server_trains_the_next_graph(capped):
    failed = capped.run(train_prompt(2048, "too_big"))  # its attention alone needs several GiB
    assert failed["status"]["status_str"] == "error", failed["status"]
    error = next(m[1] for m in failed["status"]["messages"] if m[0] == "execution_error")
    assert error["node_type"] == "TrainTriLoRA"
    assert error["exception_type"].endswith("TrainingOutOfMemoryError"), error["exception_type"]
    assert re.match(r"TrainTriLoRA: out of memory at step 1 of 2 on cpu \(.*can't allocate memory.*\)\. The "
                    r"memory of the run was released\. .* No step succeeded, so there is no trained adapter to "
                    r"keep\.\n", error["exception_message"]), error["exception_message"]
    assert "Got an OOM, unloading all loaded models." in capped.log_tail(20000)
    assert not list(capped.loras.rglob("too_big*"))  # no step finished: nothing written, nothing half-written

    after = capped.run(train_prompt(64, "after"))  # the same cap: the memory came back
    assert after["status"]["status_str"] == "success", (after["status"], capped.log_tail())
    assert any(capped.loras.glob("after_*.safetensors"))
    assert capped.proc.poll() is None
