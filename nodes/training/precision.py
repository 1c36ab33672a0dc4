"""The base model's precision and where its weights stay while a run trains: ``training_dtype``
(with ``none``, the model's own dtype, as ComfyUI 0.33's TrainLoraNode means it), bases stored in
float8, and ``offloading`` (ComfyUI's low-VRAM partial load, as TrainLoraNode's offloading uses it).

A float8 base (UNETLoader ``weight_dtype`` fp8_e4m3fn / fp8_e5m2) trains as ComfyUI samples it:
its layers are ComfyUI's manual-cast layers (comfy.ops), which cast each weight to the compute
dtype inside the forward; the stored float8 tensor is never written or replaced, and the adapter,
in float32, adds its delta to the layer's output in the compute dtype (targets.py). Every check
here runs before the model is loaded or anything trains, and names the input to change."""
from __future__ import annotations

import inspect
import logging

import comfy.model_management as mm
import comfy.ops
import comfy.patcher_extension
import comfy.sampler_helpers
import torch

from .config import NODE, TRAINING_DTYPES, TrainArgs

log = logging.getLogger("comfyui-trilora")

_OFFLOAD_KEY = "trilora_offloading"
# The vram states in which ComfyUI loads every model whole (--highvram, --gpu-only; unified memory).
_WHOLE_LOAD_STATES = ("HIGH_VRAM", "SHARED")


def autocast_dtype(args: TrainArgs, model_patcher) -> torch.dtype:
    """The dtype the forward and backward run in (autocast; float32: no autocast). ``none``:
    TrainLoraNode's rule, fp16 for a model stored in fp16 (with loss scaling), else bf16."""
    dtype = TRAINING_DTYPES[args.training_dtype]
    if dtype is not None:
        return dtype
    return torch.float16 if model_patcher.model.get_dtype() == torch.float16 else torch.bfloat16


def set_compute_dtype(args: TrainArgs, model_patcher) -> None:
    """The clone's compute dtype: the chosen one, or for ``none`` the one ComfyUI loaded it with
    (its manual-cast dtype for a float8 or half-precision base the device cannot compute in)."""
    dtype = TRAINING_DTYPES[args.training_dtype]
    if dtype is not None:
        model_patcher.set_model_compute_dtype(dtype)


def float8_matmul_layers(diffusion_model: torch.nn.Module) -> list[str]:
    """Layers that multiply in float8 (ComfyUI's fp8_ops: UNETLoader's fp8_e4m3fn_fast, or --fast
    fp8_matrix_mult, on a GPU with float8 compute): their matmul has no backward pass."""
    fast = getattr(comfy.ops, "fp8_ops", None)
    if fast is None:
        return []
    return [name for name, m in diffusion_model.named_modules()
            if isinstance(m, fast.Linear) and getattr(m, "weight", None) is not None
            and m.weight.dtype == torch.float8_e4m3fn]


def check_base(args: TrainArgs, model_patcher) -> None:
    """Raises ValueError (naming the input) for a base and settings that cannot train; warns
    where an option has nothing to do. Runs before anything is loaded or trained."""
    fast = float8_matmul_layers(model_patcher.model.diffusion_model)
    if fast:
        raise ValueError(
            f"{NODE}: the model multiplies in float8 ({len(fast)} layers, first {fast[0]}): ComfyUI's fast "
            "float8 matmul has no backward pass, so it cannot train. Load the model with UNETLoader's "
            "weight_dtype fp8_e4m3fn (not fp8_e4m3fn_fast) and without --fast fp8_matrix_mult; the float8 "
            "weights then train computed in training_dtype.")
    if args.offloading:
        check_offloading(model_patcher)


def check_offloading(model_patcher) -> None:
    """Refuses offloading where ComfyUI never leaves weights in CPU memory; notes it on the CPU."""
    state = getattr(mm.vram_state, "name", str(mm.vram_state))
    if state in _WHOLE_LOAD_STATES or not mm.lowvram_available:
        raise ValueError(
            f"{NODE}: offloading is on, but ComfyUI runs with every model loaded whole (vram state "
            f"{state}: --highvram, --gpu-only or unified memory), so it cannot keep weights in CPU "
            "memory. Turn offloading off, or start ComfyUI without --highvram/--gpu-only.")
    if mm.is_device_cpu(model_patcher.load_device):
        log.warning("%s: offloading is on, but the model runs on the CPU, where its weights already are: "
                    "nothing to offload.", NODE)


def can_offload(args: TrainArgs, device) -> bool:
    """Whether turning offloading on would keep weights off ``device`` (the out-of-memory hint)."""
    return not args.offloading and not mm.is_device_cpu(device)


def _prepare_sampling_offloaded(executor, model, noise_shape, conds, model_options=None, **kwargs):
    """The guider's model loading as TrainLoraNode's offloading asks for it: every byte (0.33's
    ``force_offload``), so ComfyUI keeps loaded only what fits and streams the rest per layer. A
    ComfyUI without force_offload (0.3.75) gets 0.33's force_offload branch of _prepare_sampling."""
    helpers = comfy.sampler_helpers
    if "force_offload" in inspect.signature(helpers._prepare_sampling).parameters:
        return executor(model, noise_shape, conds, model_options=model_options,
                        **{**kwargs, "force_full_load": False, "force_offload": True})
    models = helpers.get_additional_models(conds, model.model_dtype())[0]
    models += helpers.get_additional_models_from_model_options(model_options)
    models += model.get_nested_additional_models()
    mm.load_models_gpu([model, *models], memory_required=1e20, force_full_load=False)
    return model.model, conds, models


def load(args: TrainArgs, model_patcher) -> None:
    """Loads the clone for training: whole (as TrainLoraNode without offloading), or with
    offloading partially, through ComfyUI's partial load, here and in the guider's own loading."""
    if args.offloading:
        model_patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING, _OFFLOAD_KEY,
                                           _prepare_sampling_offloaded)
    mm.load_models_gpu([model_patcher], memory_required=1e20, force_full_load=not args.offloading)
