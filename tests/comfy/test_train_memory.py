"""What a TrainTriLoRA step allocates, watched op by op (torch's dispatch mode) in the real ComfyUI.

ComfyUI's executor runs every node under torch.inference_mode and loads models under it, so the
weights are inference tensors. A step must still never build a tensor the size of an adapted
weight (out x in): no per-forward copy of a weight, no materialised delta W. At full width such a
tensor per layer per step is what decides whether a run fits (see BENCHMARKS.md, "full size")."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from conftest import TINY
from torch.utils._python_dispatch import TorchDispatchMode

from harness.host import pack_module


class WeightSizedOps(TorchDispatchMode):
    """Counts ops that allocate a tensor of one of ``shapes`` (views of their inputs left out)."""

    def __init__(self, shapes):
        super().__init__()
        self.shapes = set(shapes)
        self.found = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if (isinstance(t, torch.Tensor) and tuple(t.shape) in self.shapes
                    and t.untyped_storage().data_ptr() not in inputs):
                self.found[(str(func), tuple(t.shape))] += 1
        return out


@pytest.fixture(scope="module")
def executor_model(comfy_host):
    with torch.inference_mode():  # as the executor runs CheckpointLoaderSimple
        model = comfy_host.nodes.CheckpointLoaderSimple().load_checkpoint(TINY)[0]
    assert next(model.model.diffusion_model.parameters()).is_inference()
    return model


@pytest.mark.parametrize("checkpointing", [False, True])
def test_no_weight_sized_tensor_per_step_under_the_executors_inference_mode(comfy_host, executor_model,
                                                                            checkpointing):

    train = pack_module(comfy_host, "nodes.training")
    shapes = {tuple(m.weight.shape) for m in executor_model.model.diffusion_model.modules()
              if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.ndim >= 2
              and m.weight.numel() >= 64 * 64}
    assert len(shapes) > 5
    g = torch.Generator().manual_seed(0)
    latents = [{"samples": torch.randn(1, 4, 8, 8, generator=g)} for _ in range(2)]
    positive = [[torch.randn(1, 77, 768, generator=g), {}]]
    watch = WeightSizedOps(shapes)
    real_step = train.TriLoRATrainer._step

    def watched_step(self, *args, **kwargs):  # the steps only: setup and the result may touch weights once
        with watch:
            return real_step(self, *args, **kwargs)

    train.TriLoRATrainer._step = watched_step
    try:
        with torch.inference_mode():
            out = comfy_host.nodes.NODE_CLASS_MAPPINGS["TrainTriLoRA"].execute(
                model=[executor_model], latents=latents, positive=[positive], steps=[2], rank=[3], seed=[0],
                training_dtype=["fp32"], gradient_checkpointing=[checkpointing])
    finally:
        train.TriLoRATrainer._step = real_step
    assert out.result[3] == 2
    assert not watch.found, f"weight-sized tensors built per step: {dict(watch.found.most_common(5))}"
