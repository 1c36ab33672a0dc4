"""TrainTriLoRA on a partially loaded model, as ComfyUI runs it on a card too small for the model.

On such a card ComfyUI's sampler preparation (which the trainer goes through) frees memory by
partially unloading the model: modules whose weights stay on the offload device are switched to
`comfy_cast_weights` (the trainer's compute dtype switches every layer to it anyway) and their
weights are no longer loaded: their forward casts the weight to the compute device on every call.
The trainer's bypass adapters must see the same layer outputs then, so the trained factors are
the same as on a fully loaded model, and the step must build no weight-sized tensor of its own.

On the CPU the offload and the compute device are the same, so the casts are no-ops and this
shows correctness and the absence of copies made by the pack, not the VRAM saved (BENCHMARKS.md,
section 6, "low-VRAM loading")."""
from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import TINY
from test_train_memory import WeightSizedOps

from harness.host import pack_module


@pytest.fixture(scope="module")
def executor_model(comfy_host):
    with torch.inference_mode():  # as the executor runs CheckpointLoaderSimple
        return comfy_host.nodes.CheckpointLoaderSimple().load_checkpoint(TINY)[0]


@contextlib.contextmanager
def offloaded_by_sampler_preparation(comfy_host, fraction: float, seen: dict):
    """After the sampler's own model loading, ComfyUI's free_memory step for a card with too
    little free memory: ``LoadedModel.model_unload(memory_to_free)``, which offloads part of the
    model (``ModelPatcher.partially_unload``) and leaves it loaded in low-VRAM mode."""
    import comfy.sampler_helpers

    real = comfy.sampler_helpers.prepare_sampling

    def prepare_sampling(model, *args, **kwargs):
        out = real(model, *args, **kwargs)
        loaded = next(m for m in comfy_host.mm.current_loaded_models if m.model is model)
        assert loaded.model_unload(memory_to_free=int(model.model_size() * fraction)) is False  # still loaded
        return out

    comfy.sampler_helpers.prepare_sampling = real if fraction == 0 else prepare_sampling
    try:
        yield
    finally:
        comfy.sampler_helpers.prepare_sampling = real
        comfy_host.mm.unload_all_models()  # back to a plain model for the next run


def train_watched(comfy_host, model, checkpointing: bool, offload_fraction: float):
    train = pack_module(comfy_host, "nodes.training")
    shapes = {tuple(m.weight.shape) for m in model.model.diffusion_model.modules()
              if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.ndim >= 2
              and m.weight.numel() >= 64 * 64}
    g = torch.Generator().manual_seed(0)
    latents = [{"samples": torch.randn(1, 4, 8, 8, generator=g)} for _ in range(2)]
    positive = [[torch.randn(1, 77, 768, generator=g), {}]]
    watch, seen = WeightSizedOps(shapes), {}
    real_step = train.TriLoRATrainer._step

    def watched_step(self, *args, **kwargs):
        if seen:
            with watch:
                return real_step(self, *args, **kwargs)
        # First step: the load state the step runs in, and the offloaded weights that autograd
        # keeps from the forward to the backward (on a GPU, each such weight is a device copy).
        offloaded = {n: m for n, m in self.mp.model.diffusion_model.named_modules()
                     if hasattr(m, "comfy_cast_weights") and m.comfy_patched_weights is False}
        storages = {m.weight.untyped_storage().data_ptr(): m.weight.untyped_storage().nbytes()
                    for m in offloaded.values() if isinstance(getattr(m, "weight", None), torch.Tensor)}
        kept = {}

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr in storages:
                kept[ptr] = storages[ptr]
            return t

        seen.update(lowvram=self.mp.model.model_lowvram, offloaded=set(offloaded.values()),
                    targets={t.prefix: t.module for t in self.targets}, kept=kept)
        with watch, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            return real_step(self, *args, **kwargs)

    train.TriLoRATrainer._step = watched_step
    try:
        with offloaded_by_sampler_preparation(comfy_host, offload_fraction, seen), torch.inference_mode():
            out = comfy_host.nodes.NODE_CLASS_MAPPINGS["TrainTriLoRA"].execute(
                model=[model], latents=latents, positive=[positive], steps=[2], rank=[3], seed=[0],
                training_dtype=["fp32"], gradient_checkpointing=[checkpointing],
                # The settings this comparison's rounding bound was set at (unweighted, lr 2.5e-4): Adam's
                # first steps turn the sign of a gradient within rounding of 0 into a whole update.
                target_layers=["all linear+conv"], loss_weighting=["none"], validate_every=[0], learning_rate=[2.5e-4])
    finally:
        train.TriLoRATrainer._step = real_step
    return out.result, watch, seen


@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_partially_loaded_equals_the_full_load(comfy_host, executor_model, checkpointing, caplog):
    full, full_watch, _ = train_watched(comfy_host, executor_model, checkpointing, 0.0)
    part, part_watch, seen = train_watched(comfy_host, executor_model, checkpointing, 0.25)

    assert seen["lowvram"] is True
    adapted_offloaded = [p for p, m in seen["targets"].items() if m in seen["offloaded"]]
    assert 10 <= len(adapted_offloaded) < len(seen["targets"]), "adapted layers both offloaded and loaded"
    # Each offloaded weight is used inside one checkpointed block at a time, never kept from the
    # forward to the backward (on a GPU each kept one would be a device copy: without checkpointing
    # 71% of the offloaded bytes were). So a partial load turns checkpointing on, and says so.
    assert not seen["kept"], f"{sum(seen['kept'].values())} bytes of offloaded weights kept for the backward"
    assert ("partially loaded (low VRAM)" in caplog.text) is not checkpointing
    assert full[3] == part[3] == 2
    # Bit for bit with checkpointing on both sides; without it on the full side, the partial load's
    # checkpointing adds a block input's gradients in another order (float rounding only).
    # (Compared as weight updates then: the canonical SVD factors of near-equal singular values
    # turn within their subspace by more than the update changes.)
    if checkpointing:
        assert full[2]["loss"] == part[2]["loss"]
        for prefix, layer in full[1].layers.items():
            other = part[1].layers[prefix]
            for name in ("u", "s", "vt"):
                assert torch.equal(getattr(layer, name), getattr(other, name)), (prefix, name)
    else:
        # rtol 1e-5: the x0-weighted loss (sigma^2 up to ~200 on SD1.5) carries the reordering's
        # rounding up with it; 2.5e-7 relative was seen on ComfyUI 0.33.
        torch.testing.assert_close(torch.tensor(full[2]["loss"]), torch.tensor(part[2]["loss"]), rtol=1e-5, atol=0)
        for prefix, layer in full[1].layers.items():
            delta, other = layer.delta(), part[1].layers[prefix].delta()
            assert float((delta - other).abs().max()) <= 1e-4 * float(delta.abs().max()), prefix
    assert not full_watch.found and not part_watch.found, dict(part_watch.found.most_common(5))
