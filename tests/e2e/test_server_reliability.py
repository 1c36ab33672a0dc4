"""A real ComfyUI server keeps serving through what strangers' files and users do:

- a file replaced on disk (same size, same modification time) gives a new image on the next run
  of the same workflow, the image a fresh copy of the new file gives;
- two prompts queued back to back with one file at different strengths give different images,
  each the image its prompt gives alone;
- a workflow that fails in a TriLoRA node (corrupt file, file for another base model, LoHa
  file, NaN values, a trilora_name that does not exist) is reported the way ComfyUI reports
  errors: an execution_error in the prompt's history naming the node type and the file, or
  ComfyUI's validation error (HTTP 400 from /prompt, nothing queued); the server process lives on
  and the next good workflow runs.
"""
from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from conftest import TINY
from PIL import Image
from safetensors.torch import save_file

from trilora_core import TriLoRALayer, write_trilora

# kohya prefix -> the tiny UNet's weight shape: linear, non-square linear, 3x3 conv, 1x1 conv
SHAPES = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (320, 320),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (320, 768),
    "lora_unet_down_blocks_0_resnets_0_conv1": (320, 320, 3, 3),
    "lora_unet_down_blocks_0_attentions_0_proj_in": (320, 320, 1, 1),
}
LOADER = "2"  # the TriLoRALoader's node id in every prompt below
SAMPLER = "6"


def layers(seed: int, rank: int = 4) -> dict[str, TriLoRALayer]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for prefix, shape in SHAPES.items():
        u = torch.randn(shape[0], rank, generator=g) * 0.2
        vt = torch.randn(rank, *shape[1:], generator=g) * 0.2
        out[prefix] = TriLoRALayer(u, torch.rand(rank, generator=g) + 1.0, vt, float(rank))
    return out


def prompt(lora_name: str, strength: float = 1.0, seed: int = 1, prefix: str = "reliability") -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TINY}},
        LOADER: {"class_type": "TriLoRALoader", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                 "trilora_name": lora_name, "strength_model": strength, "strength_clip": strength}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": [LOADER, 1], "text": "a red cube"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        SAMPLER: {"class_type": "KSampler", "inputs": {"model": [LOADER, 0], "positive": ["3", 0],
                  "negative": ["3", 0], "latent_image": ["5", 0], "seed": seed, "steps": 2, "cfg": 1.0,
                  "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": [SAMPLER, 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": prefix}},
    }


def messages(entry: dict, kind: str) -> list[dict]:
    return [m[1] for m in entry["status"]["messages"] if m[0] == kind]


def image(server, entry: dict) -> np.ndarray:
    assert entry["status"]["status_str"] == "success", entry["status"]
    saved = entry["outputs"]["8"]["images"][0]
    return np.asarray(Image.open(server.output / saved["subfolder"] / saved["filename"])).copy()


def sampled(entry: dict) -> bool:
    """The sampler really ran for this prompt (not served from ComfyUI's cache)."""
    cached = [n for m in messages(entry, "execution_cached") for n in m["nodes"]]
    return SAMPLER not in cached and LOADER not in cached


def alive(server) -> None:
    assert server.proc.poll() is None, "the server process died"
    assert server.get("/system_stats")["system"]["python_version"]


def good_run_succeeds(server, seed: int) -> None:
    if not (server.loras / "reliability_good.safetensors").exists():
        write_trilora(str(server.loras / "reliability_good.safetensors"), layers(0))
    entry = server.run(prompt("reliability_good.safetensors", seed=seed))
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert image(server, entry).shape == (64, 64, 3)


def wait_for(server, prompt_id: str, timeout: float = 300) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        history = server.get(f"/history/{prompt_id}")
        status = history.get(prompt_id, {}).get("status", {})
        if status.get("status_str") in ("success", "error"):
            return history[prompt_id]
        time.sleep(0.25)
    raise AssertionError(f"prompt {prompt_id} did not finish; server log:\n{server.log_tail()}")


def test_a_file_replaced_on_disk_gives_the_new_image(server):
    path = server.loras / "reliability_replaced.safetensors"
    write_trilora(str(path), layers(1))
    first = server.run(prompt(path.name, seed=7))
    old = os.stat(path)
    write_trilora(str(path), layers(2))  # same shapes: the same size
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns))  # and the old modification time
    assert (os.stat(path).st_size, os.stat(path).st_mtime_ns) == (old.st_size, old.st_mtime_ns)
    second = server.run(prompt(path.name, seed=7))
    write_trilora(str(server.loras / "reliability_replacement.safetensors"), layers(2))
    fresh = server.run(prompt("reliability_replacement.safetensors", seed=7))
    assert sampled(second) and sampled(fresh)
    assert not np.array_equal(image(server, first), image(server, second)), "the old file's image came back"
    assert np.array_equal(image(server, second), image(server, fresh))


def test_two_strengths_queued_back_to_back_each_match_their_run_alone(server):
    name = "reliability_strengths.safetensors"
    write_trilora(str(server.loras / name), layers(3))
    ids = [server.post("/prompt", {"prompt": prompt(name, strength, seed=3, prefix=f"pair_{strength}")})["prompt_id"]
           for strength in (0.5, 1.5)]  # queued together: the second waits in the queue for the first
    pair = [wait_for(server, prompt_id) for prompt_id in ids]
    alone = [server.run(prompt(name, strength, seed=3, prefix=f"alone_{strength}")) for strength in (0.5, 1.5)]
    assert all(sampled(entry) for entry in pair + alone)
    a, b = image(server, pair[0]), image(server, pair[1])
    assert not np.array_equal(a, b), "two strengths gave the same image"
    assert np.array_equal(a, image(server, alone[0])) and np.array_equal(b, image(server, alone[1]))


def write_bad_file(path, case: str) -> str:
    """Writes a bad file of kind ``case``; returns the words its error must contain."""
    to_q = next(iter(SHAPES))
    if case == "corrupt":
        write_trilora(str(path), layers(4))
        path.write_bytes(path.read_bytes()[:-100])
        return "corrupt safetensors file"
    if case == "other_base_model":  # an SDXL-sized layer
        write_trilora(str(path), {to_q: TriLoRALayer(torch.eye(640, 2), torch.ones(2), torch.eye(2, 640), 2.0)})
        return f"{to_q}: layer shape [640, 640] does not fit the model's"
    if case == "loha":
        save_file({f"{to_q}.hada_w1_a": torch.ones(320, 2), f"{to_q}.hada_w1_b": torch.ones(2, 320),
                   f"{to_q}.hada_w2_a": torch.ones(320, 2), f"{to_q}.hada_w2_b": torch.ones(2, 320)}, str(path))
        return "this is a LoHa file, which TriLoRA cannot convert exactly; load it with ComfyUI's LoraLoader"
    if case == "nan":
        save_file({f"{to_q}.trilora_u": torch.eye(320, 2), f"{to_q}.trilora_s": torch.tensor([1.0, float("nan")]),
                   f"{to_q}.trilora_vt": torch.eye(2, 320)}, str(path))
        return f"{to_q}.trilora_s: contains NaN or infinite values"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["corrupt", "other_base_model", "loha", "nan"])
def test_a_bad_file_fails_in_comfyuis_way_and_the_server_keeps_serving(server, case):
    name = f"reliability_bad_{case}.safetensors"
    expected = write_bad_file(server.loras / name, case)
    entry = server.run(prompt(name))
    assert entry["status"]["status_str"] == "error" and entry["status"]["completed"] is False
    [error] = messages(entry, "execution_error")
    assert error["node_type"] == "TriLoRALoader" and error["node_id"] == LOADER
    assert error["exception_type"].endswith("TriLoRAFileError"), error["exception_type"]
    message = error["exception_message"]
    assert name in message and expected in message, message
    assert SAMPLER not in error["executed"] and "8" not in entry.get("outputs", {})
    alive(server)
    good_run_succeeds(server, seed=100 + len(case))
    alive(server)


def test_a_missing_file_is_comfyuis_validation_error_and_the_server_keeps_serving(server):
    body = json.dumps({"prompt": prompt("reliability_does_not_exist.safetensors")}).encode()
    request = urllib.request.Request(server.url + "/prompt", data=body, headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 400
    answer = json.loads(refused.value.read())
    assert answer["error"]["type"] == "prompt_outputs_failed_validation"
    node = answer["node_errors"][LOADER]
    assert node["class_type"] == "TriLoRALoader"
    [problem] = node["errors"]
    # ComfyUI 0.3.75 checks no V3 combo against its options; the loader's validate_inputs does
    # (newer ComfyUI, whose own combo check gives "value_not_in_list", defers to it for this input).
    assert problem["type"] == "custom_validation_failed" and problem["extra_info"]["input_name"] == "trilora_name"
    assert problem["details"] == "trilora_name - 'reliability_does_not_exist.safetensors' is not in the loras folder"
    alive(server)
    good_run_succeeds(server, seed=200)
    alive(server)
