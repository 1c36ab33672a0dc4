"""The flags ComfyUI's own trainer (TrainLoraNode) sets in comfy.model_management while it trains,
set by Train TriLoRA for every forward and backward and restored after each way a run ends.

ComfyUI 0.33 reads ``in_training`` to take differentiable paths: without it Flux, Wan, Qwen-Image,
Lumina 2 and Z-Image run rope through comfy_kitchen's fused kernels, which have no backward (the
family tests train them). ComfyUI 0.3.75 has neither flag: there the run adds them and removes them
again, which these tests see the same way."""
from __future__ import annotations

import comfy.model_management as mm
import pytest
import torch
from conftest import run_node

from harness.host import pack_module

EXPECTED = {"in_training": True, "training_fp8_bwd": False}
ABSENT = "<absent>"
ENDINGS = ("done", "cancel", "nan", "out of memory", "error")


def flags() -> dict:
    return {name: getattr(mm, name, ABSENT) for name in EXPECTED}


@pytest.fixture(scope="module")
def data(comfy_host, tiny):
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        latent = comfy_host.nodes.VAEEncode().encode(tiny.vae, torch.full((2, 64, 64, 3), 0.4))[0]
        cond = comfy_host.nodes.CLIPTextEncode().encode(tiny.clip, "a grey square")[0]
    return tiny.model, latent, cond


def ending_model(model, ending: str, seen: list):
    """A clone of the MODEL that records the flags in each forward and its backward, and on the
    second step's forward ends the run the given way (cancel: pressed during the first step)."""

    def wrapper(apply_model, args):
        calls = sum(kind == "forward" for kind, _ in seen)
        seen.append(("forward", flags()))
        out = apply_model(args["input"], args["timestep"], **args["c"])
        out.register_hook(lambda grad: seen.append(("backward", flags())))
        if ending == "cancel" and calls == 0:
            mm.interrupt_current_processing(True)
        if calls == 1:
            if ending == "nan":
                return out * float("nan")
            if ending == "out of memory":
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
            if ending == "error":
                raise RuntimeError("a custom node's patch failed")
        return out

    clone = model.clone()
    clone.set_model_unet_function_wrapper(wrapper)
    return clone


@pytest.mark.parametrize("ending", ENDINGS)
def test_flags_are_set_in_every_forward_and_backward_and_restored_after_each_ending(comfy_host, data, ending):
    model, latent, cond = data
    training = pack_module(comfy_host, "nodes.training")
    errors = {"done": None, "cancel": mm.InterruptProcessingException, "nan": training.TrainingDivergedError,
              "out of memory": training.TrainingOutOfMemoryError, "error": RuntimeError}
    before, seen = flags(), []
    inputs = {"steps": [2], "rank": [2], "training_dtype": ["fp32"], "gradient_checkpointing": [False],
              "batch_size": [2], "seed": [0], "validate_every": [0], "preview_every": [0]}  # training forwards only
    try:
        with torch.inference_mode():
            if errors[ending] is None:
                run_node(comfy_host, "TrainTriLoRA", model=[ending_model(model, ending, seen)], latents=[latent],
                         positive=[cond], **inputs)
            else:
                with pytest.raises(errors[ending]):
                    run_node(comfy_host, "TrainTriLoRA", model=[ending_model(model, ending, seen)],
                             latents=[latent], positive=[cond], **inputs)
    finally:
        mm.interrupt_current_processing(False)
    forwards = [f for kind, f in seen if kind == "forward"]
    backwards = [f for kind, f in seen if kind == "backward"]
    assert len(forwards) == (1 if ending == "cancel" else 2)
    assert len(backwards) == (1 if ending in ("cancel", "out of memory", "error") else 2)
    assert all(f == EXPECTED for f in forwards + backwards), seen
    assert flags() == before  # restored, also where ComfyUI had no such flag (0.3.75)
