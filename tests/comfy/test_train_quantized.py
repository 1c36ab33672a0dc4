"""TrainTriLoRA on bases stored in float8 (and fp16), as UNETLoader's weight_dtype loads them, and
training_dtype none (ComfyUI's TrainLoraNode's meaning: the model's own dtype).

The float8 base is loaded by ComfyUI's own path (load_diffusion_model with model_options "dtype",
what UNETLoader runs): its layers are ComfyUI's manual-cast layers, which cast each float8 weight
to the compute dtype inside the forward. The plain run it is compared with is the same fixture in
float32 holding the same numbers (each float8 value cast up, which is exact). Every float8 value is
exactly representable in bf16 and fp32, so the two runs see the same weights in the compute dtype
and run the same kernels in the same order: the bound is exact equality, factors and losses.
(Against the original float32 weights a float8 base differs by its quantization, which no bound
of the trainer's covers.) On the CPU the compute dtype of a float8 base is float32 (ComfyUI's
manual cast there); on a GPU it is bf16 or fp16: scripts/bench_gpu.py runs that case."""
from __future__ import annotations

import contextlib

import pytest
import torch
from tiny_models import stored_as, tiny_model, upcast_copy

from harness.host import pack_module

FP8_FAMILIES = ["sd15", "sdxl", "flux-dev"]  # the families float8 users train


def train(comfy_host, model, name: str, **inputs):
    """Two steps on two latents of the family; returns (TRILORA, losses)."""
    tiny = tiny_model(name)
    args = dict(steps=2, rank=3, seed=0, training_dtype="fp32", target_layers="all linear+conv",
                loss_weighting="none", validate_every=0, preview_every=0, learning_rate=2.5e-4)
    args.update(inputs)
    with torch.inference_mode():  # as the executor runs a node
        out = comfy_host.nodes.NODE_CLASS_MAPPINGS["TrainTriLoRA"].execute(
            model=[model], latents=[tiny.latent(seed=i) for i in range(2)], positive=[tiny.conditioning()],
            **{k: [v] for k, v in args.items()})
    return out.result[1], out.result[2]["loss"]


def assert_same_adapter(a, b):
    assert a[1] == b[1], "losses"
    assert a[0].layers.keys() == b[0].layers.keys()
    for prefix, layer in a[0].layers.items():
        other = b[0].layers[prefix]
        for part in ("u", "s", "vt"):
            assert torch.equal(getattr(layer, part), getattr(other, part)), (prefix, part)


def stored_state(model) -> dict:
    """Every diffusion-model tensor's (dtype, storage address, content hash)."""
    return {k: (t.dtype, t.untyped_storage().data_ptr(), hash(t.view(torch.uint8).numpy().tobytes()))
            for k, t in model.model.diffusion_model.state_dict().items()}


@contextlib.contextmanager
def watched_trainer(comfy_host):
    """The run's TriLoRATrainer, as it runs (seen["run"])."""
    trainer, seen = pack_module(comfy_host, "nodes.training.trainer").TriLoRATrainer, {}
    real = trainer.run

    def run(self, *args, **kwargs):
        seen["run"] = self
        return real(self, *args, **kwargs)

    trainer.run = run
    try:
        yield seen
    finally:
        trainer.run = real


@pytest.mark.parametrize("name", FP8_FAMILIES)
def test_a_float8_base_trains_the_adapter_of_its_float32_values_exactly(comfy_host, name):
    fp8 = stored_as(name, torch.float8_e4m3fn)
    weights = [m.weight for m in fp8.model.diffusion_model.modules()
               if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.ndim >= 2]
    assert weights and all(w.dtype == torch.float8_e4m3fn for w in weights)
    assert fp8.model.manual_cast_dtype == torch.float32  # ComfyUI's compute dtype for it on the CPU
    before = stored_state(fp8)

    quantized = train(comfy_host, fp8, name)
    plain = train(comfy_host, upcast_copy(name, fp8), name)

    assert_same_adapter(quantized, plain)
    assert all(torch.isfinite(torch.tensor(quantized[1])))
    # Nothing upcast in place, replaced or kept: the same float8 tensors with the same bytes.
    assert stored_state(fp8) == before


def test_float8_e5m2_and_training_dtypes_bf16_fp16_train_exactly_as_the_float32_values(comfy_host):
    e5m2 = stored_as("sd15", torch.float8_e5m2)
    assert_same_adapter(train(comfy_host, e5m2, "sd15"), train(comfy_host, upcast_copy("sd15", e5m2), "sd15"))
    fp8 = stored_as("sd15", torch.float8_e4m3fn)
    plain = upcast_copy("sd15", fp8)
    for dtype, expected in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        with watched_trainer(comfy_host) as seen:
            quantized = train(comfy_host, fp8, "sd15", training_dtype=dtype)
        assert seen["run"].dtype == expected and seen["run"].mp.model.manual_cast_dtype == expected
        assert seen["run"].scaler.is_enabled() is (dtype == "fp16")
        assert_same_adapter(quantized, train(comfy_host, plain, "sd15", training_dtype=dtype))


def test_training_dtype_none_on_a_float8_base_keeps_its_compute_dtype_under_bf16_autocast(comfy_host):
    """TrainLoraNode's none: the compute dtype ComfyUI loaded the model with (float32 for a float8
    base on the CPU) under bf16 autocast. Not compared with the float32 fixture bit for bit: its
    layers take the plain path (float32 norm weights), the float8 base's ComfyUI's manual cast
    (each weight cast to its input's dtype, bf16 under autocast), so the backward rounds differently."""
    fp8 = stored_as("sd15", torch.float8_e4m3fn)
    before = stored_state(fp8)
    with watched_trainer(comfy_host) as seen:
        trilora, losses = train(comfy_host, fp8, "sd15", training_dtype="none")
    run = seen["run"]
    assert run.dtype == torch.bfloat16 and not run.scaler.is_enabled()
    assert run.mp.model.manual_cast_dtype == torch.float32  # as loaded: not overridden
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert stored_state(fp8) == before


def test_the_adapter_adds_its_delta_in_the_compute_dtype(comfy_host):
    """bf16 on a float8 base: each layer's input and the adapter's delta are bf16 (the delta is
    never formed in float8 or added to the stored weight)."""
    adapter = pack_module(comfy_host, "nodes.adapter").TriLoRATrainDiff
    real, seen = adapter.h, set()

    def h(self, x, base_out):
        out = real(self, x, base_out)
        seen.add((x.dtype, base_out.dtype, out.dtype))
        return out

    adapter.h = h
    try:
        train(comfy_host, stored_as("sd15", torch.float8_e4m3fn), "sd15", training_dtype="bf16", steps=1)
    finally:
        adapter.h = real
    assert seen == {(torch.bfloat16, torch.bfloat16, torch.bfloat16)}


def test_training_dtype_none_on_an_fp16_model_trains_in_fp16_with_loss_scaling(comfy_host):
    fp16 = stored_as("sd15", torch.float16)
    before = stored_state(fp16)
    with watched_trainer(comfy_host) as seen:
        trilora, losses = train(comfy_host, fp16, "sd15", training_dtype="none")
    assert seen["run"].dtype == torch.float16 and seen["run"].scaler.is_enabled()
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert all(torch.isfinite(layer.s).all() for layer in trilora.layers.values())
    assert stored_state(fp16) == before
    assert '"training_dtype": "none"' in trilora.metadata["trilora_training_args"]


def test_a_float8_matmul_model_is_refused_before_anything_trains(comfy_host, monkeypatch):
    """UNETLoader's fp8_e4m3fn_fast on a GPU with float8 compute gives ComfyUI's fp8_ops layers,
    whose float8 matmul has no backward pass: refused, naming the setting, before the model is
    cloned or loaded. (The CPU has no float8 compute: ComfyUI is told it has, for the load.)"""
    import comfy.model_management as mm
    import comfy.ops

    monkeypatch.setattr(mm, "supports_fp8_compute", lambda device=None: True)
    import comfy.sd

    fast = comfy.sd.load_diffusion_model(str(tiny_model("sd15").path), model_options={
        "dtype": torch.float8_e4m3fn, "fp8_optimizations": True})
    assert any(isinstance(m, comfy.ops.fp8_ops.Linear) for m in fast.model.diffusion_model.modules())
    with watched_trainer(comfy_host) as seen, pytest.raises(ValueError, match="fp8_e4m3fn_fast") as err:
        train(comfy_host, fast, "sd15")
    assert "TrainTriLoRA" in str(err.value) and "no backward" in str(err.value)
    assert "run" not in seen
