"""TrainTriLoRA's offloading: the base weights stay in CPU memory and ComfyUI streams each layer to
the compute device when it runs, through its own low-VRAM partial load (the model patcher's
``load(lowvram_model_memory)``, which switches the layers it leaves out to ``comfy_cast_weights``),
asked for as ComfyUI 0.33's TrainLoraNode asks (every byte: memory_required 1e20, no full load).

On this CPU-only machine the load device is the CPU: ComfyUI loads every model whole there, and
offloading says it has nothing to do. So the tests give ComfyUI's loader a card: the CPU reported
as an NVIDIA device with vram (``is_device_cpu`` false, NORMAL_VRAM, ComfyUI's NVIDIA weight ratio
0) with room for the whole model; ComfyUI's own load_models_gpu decides what stays offloaded.
What this shows: the option reaches ComfyUI's partial load in the node's load and in the guider's
(without it the same card loads the model whole), every layer then streams as with TrainLoraNode's
offloading on NVIDIA, and the adapter is the plain run's bit for bit
(both checkpointed; the per-layer cast is a copy of the same float32 values, so the bound is
exact). What it cannot show here: memory saved and the cost of the transfers (weights never leave
the CPU): scripts/bench_gpu.py measures those on a GPU."""
from __future__ import annotations

import contextlib

import pytest
import torch
from test_train_quantized import assert_same_adapter, train, watched_trainer
from tiny_models import stored_as


@contextlib.contextmanager
def nvidia_card(comfy_host, model):
    """ComfyUI's view of the CPU as an NVIDIA card (MIN_WEIGHT_MEMORY_RATIO 0, as ComfyUI sets it
    there) with room for ComfyUI's reserve and twice ``model``: free memory is that less the
    weights of ``model`` (and its clones) loaded on it."""
    mm = comfy_host.mm
    card = mm.minimum_inference_memory() + 2 * model.model_size()

    def get_free_memory(dev=None, torch_free_too=False):
        free = card - model.model.model_loaded_weight_memory
        return (free, free) if torch_free_too else free

    names = ("is_device_cpu", "get_free_memory", "vram_state", "MIN_WEIGHT_MEMORY_RATIO")
    saved = {name: getattr(mm, name) for name in names}
    mm.unload_all_models()
    mm.is_device_cpu = lambda device: False
    mm.get_free_memory = get_free_memory
    mm.vram_state = mm.VRAMState.NORMAL_VRAM
    mm.MIN_WEIGHT_MEMORY_RATIO = 0.0
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(mm, name, value)
        mm.unload_all_models()


def load_state(seen: dict) -> dict:
    """What the run's model looked like at its first step."""
    run = seen["run"]
    modules = dict(run.mp.model.diffusion_model.named_modules())
    # Layers the partial load left out: ComfyUI casts their weights per forward and never marked
    # them loaded (comfy_patched_weights).
    streamed = {n for n, m in modules.items()
                if hasattr(m, "comfy_cast_weights") and getattr(m, "comfy_patched_weights", False) is not True}
    loaded = {n for n, m in modules.items() if getattr(m, "comfy_patched_weights", False) is True}
    return {"lowvram": run.mp.model.model_lowvram, "streamed": streamed, "loaded": loaded,
            "targets": {t.name.removeprefix("diffusion_model."): t.module for t in run.targets},
            "checkpointing": run.settings.checkpointing}


@pytest.mark.parametrize("name", ["sd15", "sdxl", "flux-dev"])
def test_offloading_streams_part_of_the_model_and_trains_the_plain_runs_adapter(comfy_host, name, caplog):
    model = stored_as(name, torch.float32)
    plain = train(comfy_host, model, name, gradient_checkpointing=True)
    with nvidia_card(comfy_host, model), watched_trainer(comfy_host) as seen:
        streamed = train(comfy_host, model, name, offloading=True)
        state = load_state(seen)

    assert state["lowvram"] is True and state["checkpointing"] is True
    # As TrainLoraNode's offloading on an NVIDIA card: every layer stays in CPU memory and streams.
    assert not state["loaded"] and set(state["targets"]) <= state["streamed"]
    assert_same_adapter(streamed, plain)
    assert "nothing to offload" not in caplog.text


def test_offloading_off_loads_the_model_whole_on_the_same_nvidia_card(comfy_host):
    model = stored_as("sd15", torch.float32)
    with nvidia_card(comfy_host, model), watched_trainer(comfy_host) as seen:
        train(comfy_host, model, "sd15", steps=1)
        state = load_state(seen)
    assert state["lowvram"] is False and not state["streamed"] and state["loaded"]


def test_offloading_with_a_float8_base_streams_the_float8_weights(comfy_host):
    fp8 = stored_as("sd15", torch.float8_e4m3fn)
    with nvidia_card(comfy_host, fp8), watched_trainer(comfy_host) as seen:
        streamed = train(comfy_host, fp8, "sd15", offloading=True)
        state = load_state(seen)
    assert state["lowvram"] is True and state["streamed"]
    assert_same_adapter(streamed, train(comfy_host, fp8, "sd15"))


def test_offloading_on_the_cpu_says_there_is_nothing_to_offload(comfy_host, caplog):
    model = stored_as("sd15", torch.float32)
    with watched_trainer(comfy_host) as seen:
        offloaded = train(comfy_host, model, "sd15", offloading=True)
        assert seen["run"].mp.model.model_lowvram is False
    assert "offloading is on, but the model runs on the CPU" in caplog.text
    assert_same_adapter(offloaded, train(comfy_host, model, "sd15"))


def test_offloading_where_comfyui_loads_models_whole_is_refused_before_anything_trains(comfy_host, monkeypatch):
    """--highvram / --gpu-only (HIGH_VRAM) and unified memory (SHARED): ComfyUI never leaves weights
    in CPU memory, so offloading could not do what it says."""
    model = stored_as("sd15", torch.float32)
    for state in ("HIGH_VRAM", "SHARED"):
        monkeypatch.setattr(comfy_host.mm, "vram_state", comfy_host.mm.VRAMState[state])
        with watched_trainer(comfy_host) as seen, pytest.raises(ValueError, match="offloading is on") as err:
            train(comfy_host, model, "sd15", offloading=True)
        assert state in str(err.value) and "--highvram" in str(err.value)
        assert "run" not in seen


def test_an_out_of_memory_ending_on_a_gpu_suggests_offloading(comfy_host):
    """The hint is offered where it would help: offloading off, on a GPU (the CPU has nothing to move)."""
    from harness.host import pack_module

    hints = pack_module(comfy_host, "nodes.training.failures").memory_hints
    precision = pack_module(comfy_host, "nodes.training.precision")
    args = pack_module(comfy_host, "nodes.training").TrainArgs
    on, off = args(offloading=True), args()
    assert precision.can_offload(off, torch.device("cuda", 0)) and not precision.can_offload(on, torch.device("cuda", 0))
    assert not precision.can_offload(off, torch.device("cpu"))
    assert "turn offloading on" in hints(1, True, torch.bfloat16, can_offload=True)
    assert "offloading" not in hints(1, True, torch.bfloat16, can_offload=False)
