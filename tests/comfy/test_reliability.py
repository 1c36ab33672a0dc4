"""Reliability of the loaders in the real ComfyUI, in-process on the tiny model:

- a file replaced on disk is noticed (the node's fingerprint changes, so ComfyUI re-runs it) and
  the next run applies the new weights, even when the new file has the same size and the same
  modification time as the old one (a copy that keeps timestamps);
- two loaders using one file at different strengths never disturb each other: each gives
  exactly its own weights and its own samples, however their runs interleave, and the cached
  factors they share are never changed;
- the temp file a killed save leaves in the loras folder never shows in ComfyUI's file list;
- a file name not in the loras folder is refused when the graph is queued.
"""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import comfy.model_management as mm
import execution
import pytest
import torch
from conftest import TINY, run_node
from trilora_files import LAYERS, assert_patched, patched_weights, random_layers, weights_restored


@pytest.fixture(autouse=True)
def originals(tiny):
    yield from weights_restored(tiny)


def load(comfy_host, tiny, name: str, strength: float):
    model, clip, _ = run_node(comfy_host, "TriLoRALoader", model=tiny.model, clip=tiny.clip, trilora_name=name,
                              strength_model=strength, strength_clip=strength)
    return model, clip


def test_a_file_replaced_on_disk_is_applied_by_the_next_run(comfy_host, tiny, originals):
    core, loader = comfy_host.core, comfy_host.nodes.NODE_CLASS_MAPPINGS["TriLoRALoader"]
    name = "reliability_replaced.safetensors"
    path = comfy_host.loras / name
    core.write_trilora(str(path), random_layers(core, tiny, seed=11))
    first = core.read_trilora(str(path)).layers
    inputs = dict(trilora_name=name, strength_model=1.0, strength_clip=1.0)
    fingerprint = loader.fingerprint_inputs(**inputs)
    assert_patched(patched_weights(*load(comfy_host, tiny, name, 1.0)), originals, first, 1.0)
    mm.unload_all_models()

    old = os.stat(path)
    core.write_trilora(str(path), random_layers(core, tiny, seed=12))  # same shapes: the same size
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns))  # and the old modification time
    new = os.stat(path)
    assert (new.st_size, new.st_mtime_ns) == (old.st_size, old.st_mtime_ns)
    second = core.read_trilora(str(path)).layers
    assert not torch.equal(second[next(iter(LAYERS))].u, first[next(iter(LAYERS))].u)

    assert loader.fingerprint_inputs(**inputs) != fingerprint, "ComfyUI would not re-run the loader"
    assert_patched(patched_weights(*load(comfy_host, tiny, name, 1.0)), originals, second, 1.0)


def sample(comfy_host, model, clip) -> torch.Tensor:
    nodes = comfy_host.nodes
    positive = nodes.CLIPTextEncode().encode(clip, "a red cube")[0]
    latent = nodes.EmptyLatentImage().generate(64, 64, 1)[0]
    # cfg 1: the negative is never evaluated, which halves the time on the CPU
    return nodes.KSampler().sample(model, 1, 2, 1.0, "euler", "normal", positive, positive, latent)[0]["samples"]


def test_two_strengths_of_one_file_do_not_disturb_each_other(comfy_host, tiny, originals):
    core = comfy_host.core
    name = "reliability_two_strengths.safetensors"
    core.write_trilora(str(comfy_host.loras / name), random_layers(core, tiny, seed=21))
    layers = core.read_trilora(str(comfy_host.loras / name)).layers
    a = load(comfy_host, tiny, name, 0.5)
    b = load(comfy_host, tiny, name, 1.5)
    factors = {key: [t.clone() for t in patch[0][1].weights[:3]] for key, patch in a[0].patches.items()}
    assert len(factors) == 4

    weights = []
    for (model, clip), strength in ((a, 0.5), (b, 1.5), (a, 0.5), (b, 1.5)):
        got = patched_weights(model, clip)
        assert_patched(got, originals, layers, strength)
        weights.append(got)
    for prefix in LAYERS:  # bit for bit the same, whatever ran in between
        assert torch.equal(weights[0][prefix], weights[2][prefix]) and torch.equal(weights[1][prefix], weights[3][prefix])
    mm.unload_all_models()

    samples = [sample(comfy_host, *pair) for pair in (a, b, a)]
    assert torch.equal(samples[0], samples[2]), "sampling at 1.5 in between changed the 0.5 samples"
    assert not torch.allclose(samples[0], samples[1], atol=1e-3), "the two strengths sampled the same"
    mm.unload_all_models()
    alone = sample(comfy_host, *load(comfy_host, tiny, name, 1.5))  # a fresh loader, nothing else in between
    assert torch.equal(alone, samples[1]), "the 1.5 samples taken between 0.5 ones differ from a run alone"

    # The adapters of both loaders share the cached factors, and nothing wrote into them.
    assert a[0].patches.keys() == b[0].patches.keys() == factors.keys()
    for key, before in factors.items():
        (_, adapter_a, *_), (_, adapter_b, *_) = a[0].patches[key][0], b[0].patches[key][0]
        assert all(x is y for x, y in zip(adapter_a.weights[:3], adapter_b.weights[:3], strict=True)), key
        assert all(torch.equal(x, y) for x, y in zip(adapter_a.weights[:3], before, strict=True)), key


# The save a test kills: 4 canonical layers of [2048, 256] factors (16 MB), written in a loop.
WRITER = """
import sys
sys.path.insert(0, sys.argv[1])
import torch
from trilora_core import TriLoRALayer, write_trilora
layers = {}
for i in range(4):
    u = torch.zeros(2048, 256)
    u[torch.randperm(2048)[:256], torch.arange(256)] = 1.0
    vt = torch.zeros(256, 2048)
    vt[torch.arange(256), torch.randperm(2048)[:256]] = 1.0
    layers[f"lora_unet_layer_{i}"] = TriLoRALayer(u, torch.linspace(2.0, 0.1, 256), vt, 16.0)
print("ready", flush=True)
while True:
    write_trilora(sys.argv[2], layers)
"""


def kill_a_save(pack_dir, target) -> list[str]:
    """SIGKILLs a process as soon as its save of ``target`` has a temp file; the temp files left."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(pack_dir), str(target)], stdout=subprocess.PIPE,
                            text=True)

    def temps() -> list[str]:
        return [n for n in os.listdir(target.parent) if n.startswith(f".{target.name}.")]

    try:
        assert proc.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 60
        while not temps() and time.monotonic() < deadline:
            time.sleep(0.0005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    return temps()


def test_temp_files_of_a_killed_save_never_show_in_the_loras_list(comfy_host, tiny):
    loras, folder_paths = comfy_host.loras, comfy_host.folder_paths
    loader = comfy_host.nodes.NODE_CLASS_MAPPINGS["TriLoRALoader"]
    target = loras / "reliability_killed.safetensors"
    for _ in range(3):  # on a busy machine the write may finish before the kill: try again
        leftovers = kill_a_save(comfy_host.pack_dir, target)
        if leftovers:
            break
    assert leftovers and all(n.endswith(".tmp") for n in leftovers), leftovers
    core = comfy_host.core  # a control the list must show
    core.write_trilora(str(loras / "reliability_listed.safetensors"), random_layers(core, tiny, seed=31))
    try:
        listed = folder_paths.get_filename_list("loras")
        spec = loader.INPUT_TYPES()["required"]["trilora_name"]  # V3: ("COMBO", {"options": [...]})
        options = spec[0] if isinstance(spec[0], list) else spec[1]["options"]
        for names in (listed, options):
            assert "reliability_listed.safetensors" in names
            assert not [n for n in names if n.endswith(".tmp") or ".reliability_killed.safetensors." in n], names
    finally:
        for name in leftovers:
            os.unlink(loras / name)


def validation_errors(prompt: dict) -> dict[str, list[str]]:
    """ComfyUI's own check of a queued prompt (execution.validate_prompt): node id -> error details."""
    _, _, _, node_errors = asyncio.run(execution.validate_prompt("validation-test", prompt, None))
    return {node: [e["details"] for e in err["errors"]] for node, err in node_errors.items()}


def file_prompts(loader: str, resize: str, existing: str) -> dict:
    """A loader, a tool and a trainer, each choosing a file from the loras folder."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TINY}},
        "2": {"class_type": "TriLoRALoaderModelOnly", "inputs": {"model": ["1", 0], "trilora_name": loader,
                                                                  "strength_model": 1.0}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a cube"}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "TrainTriLoRA", "inputs": {"model": ["2", 0], "latents": ["4", 0], "positive": ["3", 0],
                                                       "steps": 1, "rank": 4, "alpha": 4.0, "learning_rate": 0.001,
                                                       "seed": 0, "batch_size": 1, "training_dtype": "fp32",
                                                       "gradient_checkpointing": False, "existing_lora": existing}},
        "6": {"class_type": "SaveTriLoRA", "inputs": {"trilora": ["5", 1], "filename_prefix": "validation"}},
        "7": {"class_type": "TriLoRAResize", "inputs": {"trilora_name": resize, "filename_prefix": "validation",
                                                        "max_rank": 2, "energy": 1.0, "save_dtype": "fp32"}},
    }


def test_a_name_not_in_the_loras_folder_fails_validation(comfy_host, tiny):
    """ComfyUI 0.3.75 checks no V3 combo value against its options: the nodes do it themselves,
    so a missing file is a validation error when the graph is queued, not a failure halfway."""
    core = comfy_host.core
    present, absent = "reliability_present.safetensors", "reliability_absent.safetensors"
    core.write_trilora(str(comfy_host.loras / present), random_layers(core, tiny, seed=41))
    assert validation_errors(file_prompts(present, present, present)) == {}
    assert validation_errors(file_prompts(present, "[None]", "[None]")) == {}  # where no file is a choice
    missing = f"'{absent}' is not in the loras folder"
    assert validation_errors(file_prompts(absent, absent, absent)) == {
        "2": [f"trilora_name - {missing}"], "5": [f"existing_lora - {missing}"], "7": [f"trilora_name - {missing}"]}
    assert validation_errors(file_prompts("[None]", present, present)) == {
        "2": ["trilora_name - '[None]' is not in the loras folder"]}  # a loader needs a file
    loader = comfy_host.nodes.NODE_CLASS_MAPPINGS["TriLoRALoader"]
    assert loader.validate_inputs(trilora_name=None) is True  # a linked input: checked when it runs
