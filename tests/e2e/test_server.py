"""The pack in a real ComfyUI server: it starts with the pack, lists its nodes, and runs a
graph that loads a TriLoRA onto the tiny checkpoint and samples an image."""
from __future__ import annotations

import os

import torch
from conftest import TINY

from trilora_core import TriLoRALayer, write_trilora

ATTN = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def small_trilora(path, rank=4):
    g = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(320, rank, generator=g))[0]
    vt = torch.linalg.qr(torch.randn(320, rank, generator=g))[0].T.contiguous()
    write_trilora(str(path), {ATTN: TriLoRALayer(u, torch.linspace(1.0, 0.1, rank), vt, float(rank))})


def generation_prompt(lora_name: str, strength: float = 0.8) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TINY}},
        "2": {"class_type": "TriLoRALoader", "inputs": {"model": ["1", 0], "clip": ["1", 1],
              "trilora_name": lora_name, "strength_model": strength, "strength_clip": strength}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": "a red cube"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": ""}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["2", 0], "positive": ["3", 0], "negative": ["4", 0],
              "latent_image": ["5", 0], "seed": 1, "steps": 2, "cfg": 7.0, "sampler_name": "euler",
              "scheduler": "normal", "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "trilora_e2e"}},
    }


def test_server_starts_with_the_pack_and_lists_its_nodes(server):
    info = server.get("/object_info")
    assert {"TriLoRALoader", "TriLoRALoaderModelOnly"} <= set(info)
    log = server.log_tail(10**7).splitlines()
    # The pack's own entry (ComfyUI names the custom_nodes path), not ComfyUI's extras, whose paths
    # also hold "comfyui-trilora" when the repository is cloned under that name.
    pack = "custom_nodes/comfyui-trilora"
    assert not [line for line in log if pack in line and ("Cannot import" in line or "IMPORT FAILED" in line)]
    slider = info["TriLoRALoader"]["input"]["required"]["strength_model"]
    assert slider[0] == "FLOAT" and slider[1]["display"] == "slider" and slider[1]["default"] == 1.0


def test_a_graph_with_a_trilora_samples_an_image(server):
    small_trilora(server.loras / "e2e_small.safetensors")
    entry = server.run(generation_prompt("e2e_small.safetensors"))
    assert entry["status"]["status_str"] == "success", entry["status"]
    images = entry["outputs"]["8"]["images"]
    assert images and (server.output / images[0]["filename"]).is_file()


def test_a_bad_file_fails_the_graph_clearly_and_the_server_keeps_serving(server):
    (server.loras / "e2e_broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    entry = server.run(generation_prompt("e2e_broken.safetensors"))
    assert entry["status"]["status_str"] == "error"
    error = next(m[1] for m in entry["status"]["messages"] if m[0] == "execution_error")
    assert error["node_type"] == "TriLoRALoader"
    assert "e2e_broken.safetensors" in error["exception_message"]
    small_trilora(server.loras / "e2e_good.safetensors")
    assert server.run(generation_prompt("e2e_good.safetensors"))["status"]["status_str"] == "success"


def test_a_caption_rewritten_between_two_queues_is_read_again(server, tmp_path):
    """Queue, rewrite a caption in place keeping its size and mtime (cp -p, rsync -t), queue the
    same graph again: the executor runs Load Training Images again instead of serving its cache."""
    from PIL import Image

    Image.new("RGB", (64, 64)).save(tmp_path / "one.png")
    caption = tmp_path / "one.txt"
    caption.write_text("trlstyle, a red square", encoding="utf-8")
    prompt = {"1": {"class_type": "TriLoRASampleImages", "inputs": {"folder": str(tmp_path), "size": 64}},
              "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 1]}}}
    first = server.run(prompt)
    assert first["status"]["status_str"] == "success", first["status"]
    assert first["outputs"]["2"]["text"] == ["trlstyle, a red square"]
    stat = caption.stat()
    with open(caption, "r+", encoding="utf-8") as f:
        f.write("trlstyle, a tan circle")
    os.utime(caption, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (caption.stat().st_size, caption.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    second = server.run(prompt)
    assert second["outputs"]["2"]["text"] == ["trlstyle, a tan circle"]


def test_training_previews_reach_the_websocket_while_train_trilora_runs(server):
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TINY}},
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a red cube"}},
        "4": {"class_type": "TrainTriLoRA", "inputs": {
            "model": ["1", 0], "latents": ["2", 0], "positive": ["3", 0], "steps": 40, "rank": 2,
            "learning_rate": 1e-3, "seed": 0, "alpha": 2.0, "batch_size": 1, "training_dtype": "fp32",
            "gradient_checkpointing": False, "preview_every": 10, "validate_every": 0}},
        "5": {"class_type": "SaveTriLoRA", "inputs": {"trilora": ["4", 1], "filename_prefix": "e2e/previews"}},
    }
    seen = []
    entry = server.run(prompt, timeout=300, on_progress=seen.append)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert seen[-1]["previews"] == 4  # steps 10, 20, 30 and 40
    assert any(s["node"] == "4" and s["previews"] > 0 for s in seen)  # shown while node 4 runs
