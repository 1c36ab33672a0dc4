"""Training nodes: TrainTriLoRA fits a TriLoRA to a few images with the model's own denoising
objective; ApplyTriLoRA puts an in-memory TriLoRA on a model (preview without saving).

The training step goes through ComfyUI's own machinery, as its TrainLoraNode does: a guider
(Guider_Basic) prepares the model and the conditioning for whatever model family is loaded, a
custom Sampler runs the loop, model_sampling adds noise (noise_scaling) and turns the model's
output into a denoised prediction. The loss is taken in the model's own prediction space
(epsilon, v, flow velocity ...): the denoised error divided by the output's coefficient in
model_sampling.calculate_denoised, so one code path serves every family.

Adapted layers train in bypass form (forward hooks add x -> Vt -> U diag(s) to the layer's output,
as newer ComfyUI does for adapters), so no full weight gradient is ever formed; layers that are
not plain Linear/Conv fall back to a weight wrapper (W + delta). Everything attached to the
shared model is removed in `finally`, also on cancel (InterruptProcessingException, a
BaseException in newer ComfyUI, is never caught). A step that runs out of memory ends the run
the way a diverged step does: the last good adapter is saved, then a clear error is raised.
"""
from __future__ import annotations

import functools
import gc
import json
import logging
import math
import os
import re
import sys
from dataclasses import asdict, dataclass, replace

import comfy.lora
import comfy.model_management
import comfy.samplers
import comfy.utils
import folder_paths
import torch
import tqdm
from comfy_api.latest import io

from ..trilora_core import (
    SCHEDULES,
    TRAINING_ARGS_KEY,
    TriLoRAFile,
    TriLoRALayer,
    canonicalize,
    file_content_hash,
    init_layer,
    lr_lambda,
    orthogonality_penalty,
    prefixes_by_weight,
)
from ..trilora_core import optim as topt
from ..trilora_core.keys import layers_by_weight
from ..trilora_core.safetensors_io import SafetensorsReader, atomic_write_bytes, serialize
from ..trilora_core.timesteps import TIMESTEP_SAMPLINGS, sample_noise_levels
from . import family_training as family
from .adapter import TriLoRATrainDiff
from .blocks import TEXT_ENCODERS, block_group
from .families import base_model_metadata, family_of
from .family_training import AUTO, DEFAULT_GUIDANCE, FamilySettings
from .file_cache import load_cached
from .loras_folder import NONE_FILE, check_names, file_choice, files_fingerprint
from .patching import apply_trilora
from .save import TRILORA, prefix_location, save_new_file

try:  # ComfyUI's basic guider (cfg 1, positive only); the same class is rebuilt if it moves
    from comfy_extras.nodes_custom_sampler import Guider_Basic
except ImportError:  # pragma: no cover - depends on the ComfyUI version
    class Guider_Basic(comfy.samplers.CFGGuider):
        def set_conds(self, positive):
            self.inner_set_conds({"positive": positive})

log = logging.getLogger("comfyui-trilora")

LOSS_MAP = io.Custom("LOSS_MAP")
TRAINING_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
TARGETS = ("attention", "attention+feedforward", "all linear", "all linear+conv")
ANY_LAYER = "any"  # a resumed file may adapt any weight ComfyUI's key map knows
STEPS_KEY = "trilora_steps"
LOSS_KEY = "trilora_loss_history"
OPTIM_FOR_HASH_KEY = "trilora_for_hash"
OPTIM_SUFFIX = ".optim"  # not a model extension, so the sidecar never shows in the loras list
PARAM_PREFIX = "param."

# Defaults (see docs/training-defaults.md for why).
DEFAULT_RANK = 8
DEFAULT_ALPHA = 8.0
DEFAULT_LR = 5e-4
DEFAULT_S_LR_SCALE = 1.0
DEFAULT_TARGET = "all linear+conv"

_ATTN_RE = re.compile(r"(^|[._])(attn\w*|attention\w*|self_attn|cross_attn|to_q|to_k|to_v|to_out|to_qkv|qkv|"
                      r"q_proj|k_proj|v_proj|o_proj|out_proj|query|key|value)([._]|$)")
_FF_RE = re.compile(r"(^|[._])(ff\w*|mlp\w*|feed_forward|feedforward|fc1|fc2|w1|w2|w3|gate_proj|up_proj|down_proj)([._]|$)")
_CONVS = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)



class TrainingDivergedError(RuntimeError):
    """The loss or the gradients stopped being finite."""


class TrainingOutOfMemoryError(torch.OutOfMemoryError):
    """A step ran out of memory. An OutOfMemoryError, so ComfyUI's executor also unloads its models."""


def is_out_of_memory(err: BaseException) -> bool:
    if isinstance(err, (MemoryError, torch.OutOfMemoryError)):
        return True
    is_oom = getattr(comfy.model_management, "is_oom", None)  # newer ComfyUI: accelerator OOMs too
    if is_oom is not None and is_oom(err):
        return True
    # torch's CPU allocator reports a failed allocation as a plain RuntimeError
    return isinstance(err, RuntimeError) and "can't allocate memory" in str(err)


# --------------------------------------------------------------------------- inputs


def _one(value):
    """ComfyUI hands an is_input_list node every input as a list; scripts may pass plain values."""
    return value[0] if isinstance(value, list) and value else value


def _is_conditioning(value) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(e, (list, tuple)) and len(e) == 2 and isinstance(e[0], torch.Tensor) and isinstance(e[1], dict)
        for e in value)


def split_latents(latents) -> tuple[list[torch.Tensor], list[int]]:
    """([1, C, ...] per image], the LATENT input each came from) from one LATENT or a list."""
    if isinstance(latents, dict):
        latents = [latents]
    if not isinstance(latents, list) or not latents:
        raise ValueError("TrainTriLoRA: latents is empty; connect a LATENT (or a list of LATENTs) with at least one image")
    images, sources = [], []
    for n, latent in enumerate(latents):
        samples = latent.get("samples") if isinstance(latent, dict) else None
        if not isinstance(samples, torch.Tensor) or samples.ndim < 4:
            raise ValueError(f"TrainTriLoRA: latents item {n + 1} is not a LATENT (no 'samples' tensor [batch, channels, ...])")
        finite = torch.isfinite(samples.detach()).flatten(1).all(1) if samples.numel() else samples.new_ones(0)
        if not bool(finite.all()):  # a failed VAE encode; training would only say "diverged"
            raise ValueError(f"TrainTriLoRA: latents item {n + 1}, image {int((~finite).nonzero()[0]) + 1} of "
                             f"{samples.shape[0]}, holds NaN or infinite values (a failed VAE encode gives them); "
                             "encode that image again or leave it out")
        for row in samples:
            images.append(row.unsqueeze(0))
            sources.append(n)
    if not images:
        raise ValueError("TrainTriLoRA: latents is empty; connect a LATENT (or a list of LATENTs) with at least one image")
    return images, sources


def split_conditioning(positive, num_images: int, sources: list[int]) -> tuple[list, list[tuple[int, ...]]]:
    """(flat cond entries, entry indices per image): one CONDITIONING for all images, one per
    image, or one per LATENT input (for all images of that batch)."""
    conds = [positive] if _is_conditioning(positive) else positive
    if not isinstance(conds, list) or not conds or not all(_is_conditioning(c) for c in conds):
        raise ValueError("TrainTriLoRA: positive is empty or not a CONDITIONING; connect the output of a text encoder")
    entries, per_cond = [], []
    for n, cond in enumerate(conds):
        for e, (tensor, extra) in enumerate(cond):
            named = [("cond", tensor), *((k, v) for k, v in extra.items() if isinstance(v, torch.Tensor))]
            for what, value in named:
                if value.is_floating_point() and not bool(torch.isfinite(value.detach()).all()):
                    raise ValueError(f"TrainTriLoRA: positive item {n + 1}" + (f", entry {e + 1}" if len(cond) > 1
                                     else "") + f" holds NaN or infinite values in its {what} tensor; encode "
                                     "that prompt again")
        per_cond.append(tuple(range(len(entries), len(entries) + len(cond))))
        entries.extend(cond)
    num_batches = sources[-1] + 1
    if len(conds) == 1:
        image_conds = [per_cond[0]] * num_images
    elif len(conds) == num_images:
        image_conds = per_cond
    elif len(conds) == num_batches:
        image_conds = [per_cond[s] for s in sources]
    else:
        raise ValueError(f"TrainTriLoRA: got {len(conds)} conditionings for {num_images} images "
                         f"(in {num_batches} LATENT input{'s' if num_batches > 1 else ''}); give one "
                         f"conditioning for all images, one per image, or one per LATENT input")
    return entries, image_conds


def _clone_tree(value):
    """Tensors cloned outside inference mode (inputs made under it cannot be saved for backward)."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _clone_tree(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clone_tree(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_clone_tree(v) for v in value)
    return value


@dataclass
class TrainArgs:
    """The run's arguments, as stored in the file's metadata."""

    steps: int
    rank: int
    learning_rate: float
    seed: int
    alpha: float
    batch_size: int
    grad_accumulation_steps: int
    optimizer: str
    lr_schedule: str
    warmup_steps: int
    loss_function: str
    s_learning_rate_scale: float
    orthogonality_penalty: float
    target_layers: str
    training_dtype: str
    gradient_checkpointing: bool
    existing_lora: str
    checkpoint_every: int
    checkpoint_prefix: str
    timestep_sampling: str = AUTO
    guidance: float = DEFAULT_GUIDANCE

    def check(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"TrainTriLoRA: {message}")

        need(self.steps >= 1, f"steps must be at least 1, got {self.steps}")
        need(self.rank >= 1, f"rank must be at least 1, got {self.rank}")
        need(math.isfinite(self.learning_rate) and self.learning_rate > 0,
             f"learning_rate must be a positive number, got {self.learning_rate}")
        need(math.isfinite(self.alpha) and self.alpha > 0, f"alpha must be a positive number, got {self.alpha}")
        need(self.batch_size >= 1, f"batch_size must be at least 1, got {self.batch_size}")
        need(self.grad_accumulation_steps >= 1,
             f"grad_accumulation_steps must be at least 1, got {self.grad_accumulation_steps}")
        need(self.optimizer in topt.OPTIMIZERS,
             f"optimizer must be one of {', '.join(topt.OPTIMIZERS)}, got {self.optimizer!r}")
        need(self.lr_schedule in SCHEDULES, f"lr_schedule must be one of {', '.join(SCHEDULES)}, got {self.lr_schedule!r}")
        need(self.warmup_steps >= 0, f"warmup_steps must not be negative, got {self.warmup_steps}")
        need(self.loss_function in topt.LOSS_FUNCTIONS,
             f"loss_function must be one of {', '.join(topt.LOSS_FUNCTIONS)}, got {self.loss_function!r}")
        need(math.isfinite(self.s_learning_rate_scale) and self.s_learning_rate_scale > 0,
             f"s_learning_rate_scale must be a positive number, got {self.s_learning_rate_scale}")
        need(math.isfinite(self.orthogonality_penalty) and self.orthogonality_penalty >= 0,
             f"orthogonality_penalty must be 0 or more, got {self.orthogonality_penalty}")
        need(self.target_layers in TARGETS, f"target_layers must be one of {', '.join(TARGETS)}, got {self.target_layers!r}")
        need(self.training_dtype in TRAINING_DTYPES,
             f"training_dtype must be one of {', '.join(TRAINING_DTYPES)}, got {self.training_dtype!r}")
        need(self.checkpoint_every >= 0, f"checkpoint_every must be 0 (off) or more, got {self.checkpoint_every}")
        prefix_location(self.checkpoint_prefix, "TrainTriLoRA", "checkpoint_prefix")
        need(self.timestep_sampling in (AUTO, *TIMESTEP_SAMPLINGS),
             f"timestep_sampling must be one of {', '.join((AUTO, *TIMESTEP_SAMPLINGS))}, got {self.timestep_sampling!r}")
        need(math.isfinite(self.guidance) and self.guidance >= 0, f"guidance must be 0 or more, got {self.guidance}")


# --------------------------------------------------------------------------- model side


@dataclass
class Target:
    name: str  # module name under the BaseModel, e.g. diffusion_model.input_blocks.1.1...
    module: torch.nn.Module
    prefix: str  # file prefix (kohya name where ComfyUI knows one)
    weight_shape: tuple[int, ...]


def _layer_kind_ok(name: str, module: torch.nn.Module, target: str, fused_attention: re.Pattern | None = None) -> bool:
    if target == ANY_LAYER:
        return True
    is_linear = isinstance(module, torch.nn.Linear)
    if target == "all linear+conv":
        return is_linear or isinstance(module, _CONVS)
    if not is_linear:
        return False
    if target == "all linear":
        return True
    if _ATTN_RE.search(name) or (fused_attention is not None and fused_attention.search(name)):
        return True
    return target == "attention+feedforward" and bool(_FF_RE.search(name))


def find_targets(model_patcher, target: str) -> list[Target]:
    """The diffusion model's Linear/Conv layers of the chosen kind that ComfyUI's key map
    knows (so the file applies back to the model), sorted by prefix. The attention presets
    include the family's fused attention layers (a Flux single block's linear1 and linear2)."""
    base = model_patcher.model
    fused = family_of(model_patcher).fused_attention
    by_weight = prefixes_by_weight(comfy.lora.model_lora_keys_unet(base, {}))
    found = []
    for name, module in base.named_modules():
        weight = getattr(module, "weight", None)
        key = f"{name}.weight"
        if not isinstance(weight, torch.Tensor) or weight.ndim < 2 or key not in by_weight:
            continue
        if _layer_kind_ok(name, module, target, fused):
            found.append(Target(name, module, by_weight[key], tuple(weight.shape)))
    return sorted(found, key=lambda t: t.prefix)


def trainable_alias(tensor: torch.Tensor) -> torch.Tensor:
    """A normal tensor on the same memory as ``tensor``, an inference tensor (the model was loaded
    under the executor's torch.inference_mode), which autograd refuses to save for backward.

    Made once per run, it costs no copy: a clone per forward would copy every weight on every step
    (and keep them all until the backward). Safe because training never writes the base weights
    (frozen, and ComfyUI's models run in eval mode). Tensor subclasses (quantized weights) are
    cloned once."""
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        return tensor.clone()
    alias = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
    return alias.set_(tensor.untyped_storage(), tensor.storage_offset(), tensor.size(), tensor.stride())


def _bypass_hook(adapter, module, args, kwargs, output):
    x = args[0] if args else next(iter(kwargs.values()))
    adapter.calls += 1
    return output + adapter.h(x, output)


class Attachment:
    """Everything put on the shared model for training, and its exact removal."""

    def __init__(self):
        self.handles = []
        self.functions = []  # (list object, function)
        self.swapped = []  # (dict, name, original)
        self.grad_flags = []
        self.forwards = []  # (module, the instance forward it had or None)
        self.own_lists = []  # (module, attribute) lists created here

    def add_function(self, module, attribute: str, fn) -> None:
        if attribute not in module.__dict__:  # never append to a class-level default list
            setattr(module, attribute, list(getattr(module, attribute)))
            self.own_lists.append((module, attribute))
        functions = getattr(module, attribute)
        functions.append(fn)
        self.functions.append((functions, fn))

    def detach(self) -> None:
        for handle in reversed(self.handles):
            handle.remove()
        for functions, fn in reversed(self.functions):
            for i in range(len(functions) - 1, -1, -1):
                if functions[i] is fn:
                    del functions[i]
                    break
        for store, name, original in reversed(self.swapped):
            store[name] = original
        for module, previous in reversed(self.forwards):
            if previous is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = previous
        for module, attribute in reversed(self.own_lists):
            if not getattr(module, attribute):
                module.__dict__.pop(attribute, None)
        for param, flag in self.grad_flags:
            # An inference tensor's flag may only be set back inside inference mode.
            with torch.inference_mode(param.is_inference()):
                param.requires_grad_(flag)
        self.__init__()


def attach(diffusion_model: torch.nn.Module, targets: list[Target], adapters: dict, checkpointing: bool) -> Attachment:
    att = Attachment()
    try:
        for param in diffusion_model.parameters():
            att.grad_flags.append((param, param.requires_grad))
            param.requires_grad_(False)
        for module in diffusion_model.modules():
            for store in (module._parameters, module._buffers):
                for pname, tensor in list(store.items()):
                    if tensor is None or not tensor.is_inference():
                        continue
                    alias = trainable_alias(tensor)
                    store[pname] = torch.nn.Parameter(alias, requires_grad=False) if store is module._parameters else alias
                    att.swapped.append((store, pname, tensor))
        for target in targets:
            adapter, module = adapters[target.prefix], target.module
            adapter.calls, adapter.multiplier = 0, 1.0
            plain_conv = isinstance(module, _CONVS) and module.groups == 1 and module.padding_mode == "zeros"
            if isinstance(module, torch.nn.Linear) or plain_conv:
                adapter.is_conv = plain_conv
                adapter.conv_dim = module.weight.ndim - 2
                adapter.kw_dict = ({"stride": module.stride, "padding": module.padding, "dilation": module.dilation}
                                   if plain_conv else {})
                att.handles.append(module.register_forward_hook(functools.partial(_bypass_hook, adapter),
                                                                with_kwargs=True))
            elif hasattr(module, "weight_function"):
                adapter.calls = None  # counted only for hooks
                att.add_function(module, "weight_function", adapter)
        if checkpointing:
            for module in _checkpoint_units(diffusion_model):
                att.forwards.append((module, module.__dict__.get("forward")))
                _checkpoint(module)
    except BaseException:
        att.detach()
        raise
    return att


def _checkpoint_units(model: torch.nn.Module, found=None) -> list[torch.nn.Module]:
    """The highest submodules with a forward (containers are looked into), as ComfyUI's
    TrainLoraNode picks them for gradient checkpointing."""
    found = [] if found is None else found
    for child in model.children():
        if isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential, torch.nn.ModuleDict)):
            _checkpoint_units(child, found)
        else:
            found.append(child)
    return found


def _checkpoint(module: torch.nn.Module) -> None:
    forward = module.forward

    def run(args, kwargs):
        return forward(*args, **kwargs)

    def checkpointed(*args, **kwargs):
        return torch.utils.checkpoint.checkpoint(run, args, kwargs, use_reentrant=False)

    module.forward = checkpointed


# --------------------------------------------------------------------------- the run


@dataclass
class StartState:
    """Where a run starts: fresh factors or a resumed file (with optimizer state if its sidecar fits)."""

    layers: dict[str, TriLoRALayer]
    step: int = 0
    loss_history: list | None = None
    optimizer_tensors: dict | None = None
    source: str | None = None


def sidecar_path(path: str) -> str:
    root, _ = os.path.splitext(path)
    return root + OPTIM_SUFFIX


def read_start(args: TrainArgs, targets: list[Target]) -> StartState:
    if args.existing_lora in (NONE_FILE, "", None):
        gen = topt.generator(args.seed, "init")
        layers = {t.prefix: init_layer(t.weight_shape, args.rank, gen, alpha=args.alpha) for t in targets}
        return StartState(layers)
    path = folder_paths.get_full_path_or_raise("loras", args.existing_lora)
    adapter = load_cached(path)  # under ComfyUI's renames, as the loaders read it
    if adapter.diffs:
        raise ValueError(f"TrainTriLoRA: existing_lora {args.existing_lora!r} holds {len(adapter.diffs)} full-weight "
                         f"diffs (first: {sorted(adapter.diffs)[0]}) beside its low-rank layers, as ComfyUI's Train "
                         "LoRA writes them; training continues low-rank layers only, so it would drop them. Apply "
                         "the file with Load TriLoRA (or LoraLoader) and train a new TriLoRA on that model instead")
    meta = adapter.metadata
    step = int(meta.get(STEPS_KEY) or meta.get("ss_steps") or 0)
    try:
        history = json.loads(meta.get(LOSS_KEY, "[]"))
    except ValueError:
        history = []
    state = StartState(dict(adapter.layers), step, history if isinstance(history, list) else [], source=path)
    side = sidecar_path(path)
    if os.path.exists(side):
        try:
            with SafetensorsReader(side) as reader:
                if reader.metadata().get(OPTIM_FOR_HASH_KEY) == file_content_hash(path):
                    tensors = {k: reader.tensor(k) for k in reader.keys()}
                    raw = {}
                    for prefix, layer in state.layers.items():
                        u, s, vt = (tensors[f"{PARAM_PREFIX}{prefix}.{p}"] for p in ("trilora_u", "trilora_s", "trilora_vt"))
                        raw[prefix] = TriLoRALayer(u, s, vt, layer.alpha)
                    state.layers, state.optimizer_tensors = raw, tensors
                else:
                    log.warning("TriLoRA: %s belongs to another version of %s; optimizer state not restored", side, path)
        except Exception as err:  # a broken sidecar only costs the optimizer state
            log.warning("TriLoRA: optimizer state %s not used: %s", side, err)
    return state


def resume_start(args: TrainArgs, model_patcher) -> tuple[list[Target], StartState]:
    """(targets, start) from existing_lora in any naming ComfyUI's key map knows: each layer is
    resolved to the weight it adapts (aliases and slices folded exactly, trilora_core.keys) and
    trained under the pack's name for that weight. Raises ValueError naming what does not fit."""
    name = f"TrainTriLoRA: existing_lora {args.existing_lora!r}"
    everything = {f"{t.name}.weight": t for t in find_targets(model_patcher, ANY_LAYER)}
    start = read_start(args, [])
    key_map = comfy.lora.model_lora_keys_unet(model_patcher.model, {})
    try:
        resolved = layers_by_weight(start.layers, key_map, {k: t.weight_shape for k, t in everything.items()})
    except ValueError as err:
        raise ValueError(f"{name}: {err}; was it made for another base model?") from None
    te = [p for p in resolved.unknown if block_group(p) in TEXT_ENCODERS]
    if te:
        raise ValueError(f"{name} holds {len(te)} text-encoder layers (first: {te[0]}); TrainTriLoRA trains the "
                         "diffusion model only, so it would drop them. Resume from a file without them")
    if resolved.unknown:
        raise ValueError(f"{name} has {len(resolved.unknown)} layers this model does not have (first: "
                         f"{resolved.unknown[0]}); was it made for another base model?")
    targets = sorted((everything[w] for w in resolved.layers), key=lambda t: t.prefix)
    start.layers = {everything[w].prefix: layer for w, layer in resolved.layers.items()}
    return targets, start


class TriLoRATrainer:
    """One training run; `run` is called by the sampler inside ComfyUI's guider."""

    def __init__(self, args: TrainArgs, model_patcher, targets, start: StartState, images, image_conds,
                 base_meta: dict, settings: FamilySettings):
        self.args, self.mp, self.targets, self.start = args, model_patcher, targets, start
        self.images, self.image_conds = images, image_conds
        self.processed: list = []  # the guider's processed cond entries, in input order
        self.by_shape: dict[tuple, list] = {}  # the same, for each latent shape
        self.settings = settings
        self.base = None  # the BaseModel, once the guider runs
        self.base_meta = {**base_meta, **settings.metadata()}
        self.dtype = TRAINING_DTYPES[args.training_dtype]
        self.device = model_patcher.load_device
        self.batch = min(args.batch_size, len(images))
        self.loss_fn = topt.loss_function(args.loss_function)
        self.total = start.step + args.steps
        self.losses: list[float] = []
        self.checkpoints: list[str] = []
        self.adapters = {}
        for target in targets:
            layer = start.layers[target.prefix]
            # Contiguous factors: LAPACK returns column-major Q, and safetensors stores only dense rows.
            vt = layer.vt.reshape(layer.rank, *target.weight_shape[1:])
            adapter = TriLoRATrainDiff(layer.u.contiguous(), layer.s.contiguous(), vt.contiguous(), layer.alpha)
            self.adapters[target.prefix] = adapter.to(self.device)
        factors = {p: (a.trilora_u, a.trilora_s, a.trilora_vt) for p, a in self.adapters.items()}
        shapes = {t.prefix: t.weight_shape for t in targets}
        self.groups = topt.param_groups(factors, shapes, args.learning_rate, args.s_learning_rate_scale)
        self.optimizer = topt.make_optimizer(args.optimizer, self.groups)
        if start.optimizer_tensors is not None:
            try:
                topt.load_optimizer_state(self.optimizer, start.optimizer_tensors)
            except ValueError as err:
                log.warning("TriLoRA: optimizer state not restored: %s", err)
        self.params = [p for g in self.groups for p in g["params"]]
        self.names = [n for g in self.groups for n in g["names"]]
        self.good = [p.detach().clone() for p in self.params]
        self.good_step = start.step
        self.schedule = lr_lambda(args.lr_schedule, self.total, args.warmup_steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)

    # ---- data

    def _processed_for(self, image: int) -> list:
        """The processed cond entries with their model inputs for this image's latent size."""
        shape = tuple(self.images[image].shape)
        if shape not in self.by_shape:
            self.by_shape[shape] = family.conds_for_shape(self.base, self.processed, shape, self.device, self.args.seed)
        return self.by_shape[shape]

    def _conds_for(self, images: list[int]):
        """Cond entries for a forward of these images (of one shape), or None when they cannot share one."""
        processed = self._processed_for(images[0])
        keys = {self.image_conds[i] for i in images}
        if len(keys) == 1:  # one conditioning: ComfyUI repeats it over the batch
            return [processed[j] for j in next(iter(keys))]
        if any(len(k) != 1 for k in keys):
            return None
        entries = [processed[self.image_conds[i][0]] for i in images]
        first = entries[0]
        for other in entries[1:]:
            if other.keys() != first.keys() or other["model_conds"].keys() != first["model_conds"].keys():
                return None
            for key, value in first.items():
                if key not in ("model_conds", "uuid") and not _same(value, other[key]):
                    return None
            for key, cond in first["model_conds"].items():
                if not (_batch_of_one(cond) and _batch_of_one(other["model_conds"][key])
                        and cond.can_concat(other["model_conds"][key])):
                    return None
        merged = dict(first)
        merged["model_conds"] = {k: c._copy_with(c.concat([e["model_conds"][k] for e in entries[1:]]))
                                 for k, c in first["model_conds"].items()}
        return [merged]

    def _forward_groups(self, batch: list[int]):
        by_shape: dict[tuple, list[int]] = {}
        for pos, image in enumerate(batch):
            by_shape.setdefault(tuple(self.images[image].shape), []).append(pos)
        groups = []
        for positions in by_shape.values():
            conds = self._conds_for([batch[p] for p in positions])
            if conds is not None:
                groups.append((positions, conds))
            else:
                groups.extend(([p], [self._processed_for(batch[p])[j] for j in self.image_conds[batch[p]]])
                              for p in positions)
        return groups

    # ---- one micro-step: forward and backward, returns the loss as a float

    def _micro(self, model_wrap, extra_args, step: int, micro: int) -> float:
        ms = model_wrap.inner_model.model_sampling
        first = (step * self.args.grad_accumulation_steps + micro) * self.batch
        batch = topt.sample_indices(self.args.seed, len(self.images), first, self.batch)
        gen = topt.generator(self.args.seed, "noise", step, micro)
        levels = sample_noise_levels(self.settings.timestep_sampling, len(batch), gen)
        noises = [torch.randn(self.images[i].shape, generator=gen) for i in batch]
        # ComfyUI's percent runs the other way: 0 is the start of sampling, at the most noise.
        sigmas = [float(ms.percent_to_sigma(1.0 - float(t))) for t in levels]
        autocast = torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)
        total = 0.0
        for positions, conds in self._forward_groups(batch):
            x0 = torch.cat([self.images[batch[p]] for p in positions])
            noise = torch.cat([noises[p] for p in positions]).to(self.device)
            sigma = torch.tensor([sigmas[p] for p in positions], device=self.device, dtype=torch.float32)
            xt = ms.noise_scaling(sigma, noise, x0, False)
            target = ms.noise_scaling(torch.zeros_like(sigma), torch.zeros_like(noise), x0, False)
            model_wrap.conds["positive"] = conds
            with autocast:
                denoised = model_wrap(xt, sigma, **extra_args)
            # The model's output enters calculate_denoised linearly: its coefficient turns the
            # denoised error back into the error of the model's own prediction (eps, v, flow...).
            coeff = ms.calculate_denoised(sigma, torch.ones_like(x0), torch.zeros_like(x0))
            loss = self.loss_fn((denoised.float() - target) / coeff)
            weight = len(positions) / len(batch)
            self.scaler.scale(loss * (weight / self.args.grad_accumulation_steps)).backward()
            total += float(loss.detach()) * weight
        return total

    # ---- the loop

    def run(self, model_wrap, extra_args) -> None:
        self.processed = model_wrap.conds["positive"]
        base = self.base = model_wrap.inner_model
        # The guider computed the captions' model inputs for the first latent's size.
        self.by_shape = {tuple(self.images[0].shape): self.processed}
        self.images = [img.to(self.device) for img in self.images]
        self.images = [base.process_latent_in(img) for img in self.images]
        if getattr(base, "model_lowvram", False) and not self.settings.checkpointing:
            # ComfyUI offloaded part of the model (low VRAM): each offloaded weight is cast to the
            # device per forward, and without checkpointing every such copy is kept for the backward.
            log.warning("TrainTriLoRA: the model is partially loaded (low VRAM), so gradient checkpointing is on")
            self.settings = replace(self.settings, checkpointing=True)
        att = attach(base.diffusion_model, self.targets, self.adapters, self.settings.checkpointing)
        try:
            self._loop(model_wrap, extra_args)
        finally:
            att.detach()
            model_wrap.conds["positive"] = self.processed
            self.optimizer.zero_grad(set_to_none=True)

    def _loop(self, model_wrap, extra_args) -> None:
        args = self.args
        pbar = comfy.utils.ProgressBar(args.steps)
        text = _progress_text_sender()
        console = tqdm.trange(args.steps, desc="Training TriLoRA", disable=not comfy.utils.PROGRESS_BAR_ENABLED)
        for k in console:
            step = self.start.step + k  # updates done before this one
            oom = None
            try:
                loss = self._step(model_wrap, extra_args, step)
            except Exception as err:
                if not is_out_of_memory(err):
                    raise
                oom = str(err).splitlines()[0] if str(err) else type(err).__name__
            if oom is not None:  # handled out here, where the failed step's tensors are already freed
                self._out_of_memory(step + 1, oom)
            self.losses.append(loss)
            if k == 0:
                self._warn_unused()
            console.set_postfix({"loss": f"{loss:.4f}"})
            pbar.update_absolute(k + 1, args.steps)
            text(f"step {step + 1}/{self.total}  loss {loss:.4f}")
            if args.checkpoint_every and (step + 1) % args.checkpoint_every == 0:
                self.checkpoints.append(self.write_checkpoint(step + 1))
        if not topt.all_finite(self.params):
            self._diverged(self.total, "the adapter's factors are not finite after the last update")

    def _step(self, model_wrap, extra_args, step: int) -> float:
        """One optimizer update; returns its loss."""
        args = self.args
        factor = self.schedule(step)
        for group in self.groups:
            group["lr"] = group["base_lr"] * factor
        loss = 0.0
        for micro in range(args.grad_accumulation_steps):
            comfy.model_management.throw_exception_if_processing_interrupted()
            micro_loss = self._micro(model_wrap, extra_args, step, micro)
            if not math.isfinite(micro_loss):
                self._diverged(step + 1, f"the loss is not finite ({micro_loss})")
            loss += micro_loss / args.grad_accumulation_steps
        loss = self._all_reduce(loss)
        if args.orthogonality_penalty > 0:
            penalty = torch.stack([orthogonality_penalty(a.trilora_u, a.trilora_vt)
                                   for a in self.adapters.values()]).mean()
            self.scaler.scale(penalty * args.orthogonality_penalty).backward()
        self.scaler.unscale_(self.optimizer)
        if self.dtype != torch.float16 and not topt.all_finite(p.grad for p in self.params):
            self._diverged(step + 1, "the gradients are not finite")
        with torch.no_grad():  # the factors that gave this finite loss: the last good adapter
            torch._foreach_copy_(self.good, [p.detach() for p in self.params])
            self.good_step = step
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def _all_reduce(self, loss: float) -> float:
        """Called after a step's backward passes, before the update: data-parallel training
        (nodes/distributed.py) sums the gradients and losses of all ranks here. Alone: as is."""
        return loss

    def _warn_unused(self) -> None:
        # A model that calls F.linear on a layer's weight directly skips the layer's hooks.
        unused = sorted(p for p, a in self.adapters.items() if a.calls == 0)
        if unused:
            log.warning("TriLoRA: %d adapted layers never ran in the forward pass and will not learn "
                        "(first: %s)", len(unused), unused[0])

    def _diverged(self, step: int, what: str):
        lr = self.args.learning_rate
        hint = "" if self.dtype == torch.float32 else " (or try training_dtype fp32)"
        message = (f"TrainTriLoRA: training diverged at step {step} of {self.total}: {what}; "
                   f"learning_rate {lr:g} is probably too high{hint}. ")
        message += self._keep_last_good(self.good_step, from_snapshot=True, with_optimizer=False,
                                        saved="The last good adapter (after step {step}) was saved to {path}.")
        raise TrainingDivergedError(message)

    def _out_of_memory(self, step: int, what: str):
        self.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        comfy.model_management.soft_empty_cache()
        message = (f"TrainTriLoRA: out of memory at step {step} of {self.total} on {self.device} ({what}). "
                   f"The memory of the run was released. To fit, {self._memory_hints()}. ")
        # Before the update the factors and the optimizer state are those after step `done`.
        # The snapshot is taken just before the update: once it is, the update may be half done.
        done = step - 1
        in_update = self.good_step == done
        message += self._keep_last_good(done, from_snapshot=in_update, with_optimizer=not in_update,
                                        saved="The adapter after step {step} was saved to {path}; choose it as "
                                              "existing_lora to go on from there.")
        self.optimizer.state.clear()
        raise TrainingOutOfMemoryError(message)

    def _keep_last_good(self, steps_done: int, from_snapshot: bool, with_optimizer: bool, saved: str) -> str:
        """Saves the adapter after ``steps_done`` steps (the factors of the last snapshot where
        ``from_snapshot``) when this run made any; returns what the error message says of it."""
        if steps_done > self.start.step:
            if from_snapshot:
                with torch.no_grad():
                    torch._foreach_copy_([p.data for p in self.params], self.good)
            path = self.write_checkpoint(steps_done, suffix="last_good", with_optimizer=with_optimizer)
            return saved.format(step=steps_done, path=path)
        if self.start.source:
            return f"No step succeeded; the adapter you resumed from is unchanged: {self.start.source}."
        return "No step succeeded, so there is no trained adapter to keep."

    def _memory_hints(self) -> str:
        hints = []
        if self.batch > 1:
            hints.append("lower batch_size (raise grad_accumulation_steps to keep the effective batch)")
        if not self.settings.checkpointing:
            hints.append("turn gradient_checkpointing on")
        if self.dtype == torch.float32:
            hints.append("train in bf16")
        hints.append("use smaller latents or a lower rank")
        return ", ".join(hints[:-1]) + (" or " if len(hints) > 1 else "") + hints[-1]

    # ---- results

    def layers(self, canonical: bool = True) -> dict[str, TriLoRALayer]:
        out = {}
        for prefix, adapter in self.adapters.items():
            layer = TriLoRALayer(adapter.trilora_u.detach().float().cpu().clone(),
                                 adapter.trilora_s.detach().float().cpu().clone(),
                                 adapter.trilora_vt.detach().float().cpu().clone(), float(adapter.alpha))
            out[prefix] = canonicalize(layer) if canonical else layer
        return out

    def metadata(self, steps_done: int) -> dict[str, str]:
        history = list(self.start.loss_history or []) + [float(f"{v:.6g}") for v in self.losses[: steps_done - self.start.step]]
        record = asdict(self.args)
        record.update(num_images=len(self.images), resumed_from_step=self.start.step, total_steps=steps_done)
        meta = {
            TRAINING_ARGS_KEY: json.dumps(record, sort_keys=True),
            STEPS_KEY: str(steps_done),
            LOSS_KEY: json.dumps(history),
            "ss_steps": str(steps_done),
            "ss_seed": str(self.args.seed),
            "ss_learning_rate": repr(float(self.args.learning_rate)),
            "ss_num_train_images": str(len(self.images)),
            "ss_optimizer": self.args.optimizer,
        }
        meta.update(self.base_meta)
        return meta

    def write_checkpoint(self, steps_done: int, suffix: str = "", with_optimizer: bool = True) -> str:
        folder, base = prefix_location(self.args.checkpoint_prefix, "TrainTriLoRA", "checkpoint_prefix")
        adapter = TriLoRAFile(self.layers(), self.metadata(steps_done))
        path = save_new_file(adapter, folder, base, f"step{steps_done:06d}{'_' + suffix if suffix else ''}")
        if with_optimizer:
            tensors = topt.optimizer_state_tensors(self.optimizer)
            for name, param in zip(self.names, self.params, strict=True):
                tensors[PARAM_PREFIX + name] = param.detach().cpu().contiguous().clone()
            meta = {OPTIM_FOR_HASH_KEY: file_content_hash(path), "optimizer": self.args.optimizer}
            atomic_write_bytes(sidecar_path(path), serialize(tensors, meta))
        log.info("TriLoRA checkpoint (step %d) written to %s", steps_done, path)
        return path


def _same(a, b) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    try:
        return bool(a == b)
    except Exception:
        return False


def _batch_of_one(cond) -> bool:
    values = cond.cond if isinstance(cond.cond, list) else [cond.cond]
    return all(not isinstance(v, torch.Tensor) or v.ndim == 0 or v.shape[0] == 1 for v in values)


def _progress_text_sender():
    """Shows the loss under the node in the ComfyUI frontend when a server runs; else nothing."""
    try:
        from comfy_execution.utils import get_executing_context

        # Only a server ComfyUI already started: importing server.py here would start nothing useful.
        prompt_server = getattr(sys.modules.get("server"), "PromptServer", None)
        server, context = getattr(prompt_server, "instance", None), get_executing_context()
        if server is None or context is None:
            return lambda text: None
    except Exception:
        return lambda text: None

    def send(text: str) -> None:
        try:
            server.send_progress_text(text, context.node_id)
        except Exception:
            pass

    return send


class TrainSampler(comfy.samplers.Sampler):
    """Runs the training loop where a sampler would run, inside ComfyUI's guider."""

    def __init__(self, trainer: TriLoRATrainer):
        self.trainer = trainer

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        self.trainer.run(model_wrap, extra_args)
        return torch.zeros_like(latent_image)


# --------------------------------------------------------------------------- nodes


class TrainTriLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TrainTriLoRA",
            display_name="Train TriLoRA",
            category="training",
            is_input_list=True,
            description="Trains a TriLoRA (U diag(s) Vt per layer) on a few images with the model's own denoising "
                        "objective. The result is applied to the MODEL output; save it with Save TriLoRA.",
            inputs=[
                io.Model.Input(id="model", tooltip="The diffusion model to train the TriLoRA for."),
                io.Latent.Input(id="latents", tooltip="The training images as latents: one LATENT batch, or a list "
                                "of LATENTs (sizes may differ, e.g. from Make Training Dataset)."),
                io.Conditioning.Input(id="positive", tooltip="The captions: one conditioning for all images, or a list "
                                      "with one per image (or one per LATENT batch)."),
                io.Int.Input(id="steps", default=100, min=1, max=1_000_000,
                             tooltip="Optimizer steps to train (each sees batch_size x grad_accumulation_steps images)."),
                io.Int.Input(id="rank", default=DEFAULT_RANK, min=1, max=512,
                             tooltip="Rank r of each adapted layer (number of singular directions). Ignored when "
                                     "resuming: the file's rank is kept."),
                io.Float.Input(id="learning_rate", default=DEFAULT_LR, min=1e-7, max=10.0, step=1e-6,
                               tooltip="Learning rate of U and V, as for a LoRA. s gets its own, larger one (see "
                                       "s_learning_rate_scale)."),
                io.Int.Input(id="seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Decides everything random: initial factors, image order, noise and noise "
                                     "levels. The same seed gives the same TriLoRA."),
                io.Float.Input(id="alpha", default=DEFAULT_ALPHA, min=0.001, max=4096.0, step=0.5,
                               tooltip="The update is scaled by alpha / rank, as for a LoRA (and kept in the file)."),
                io.Int.Input(id="batch_size", default=1, min=1, max=10000,
                             tooltip="Images per forward pass."),
                io.Combo.Input(id="training_dtype", options=list(TRAINING_DTYPES), default="bf16",
                               tooltip="Precision of the model's forward and backward (autocast); the adapter "
                                       "itself trains in fp32. fp16 uses loss scaling. Use fp32 on a CPU."),
                io.Boolean.Input(id="gradient_checkpointing", default=True,
                                 tooltip="Recompute activations in the backward pass: much less memory, about a "
                                         "third slower. Always on for Flux, Chroma and HunyuanVideo, whose blocks "
                                         "need it."),
                io.Int.Input(id="grad_accumulation_steps", default=1, min=1, max=1024, optional=True,
                             tooltip="Forward/backward passes whose gradients are added up per optimizer step."),
                io.Combo.Input(id="optimizer", options=list(topt.OPTIMIZERS), default="AdamW", optional=True,
                               tooltip="The optimizer (torch defaults; AdamW has weight decay 0.01)."),
                io.Combo.Input(id="lr_schedule", options=list(SCHEDULES), default="constant", optional=True,
                               tooltip="How the learning rate changes over the run (after warm-up)."),
                io.Int.Input(id="warmup_steps", default=0, min=0, max=1_000_000, optional=True,
                             tooltip="Steps over which the learning rate rises linearly from 0."),
                io.Combo.Input(id="loss_function", options=list(topt.LOSS_FUNCTIONS), default="MSE", optional=True,
                               tooltip="Loss on the model's own prediction (noise, v or flow), per element."),
                io.Float.Input(id="s_learning_rate_scale", default=DEFAULT_S_LR_SCALE, min=0.001, max=1000.0,
                               step=0.01, optional=True,
                               tooltip="How fast s learns: one step changes each weight entry by about "
                                       "learning_rate x this x alpha / rank (s's own learning rate is learning_rate x "
                                       "this x sqrt(out x in / rank)). 1 learns as fast as ComfyUI's LoRA training "
                                       "or faster; lower it if training is unstable."),
                io.Float.Input(id="orthogonality_penalty", default=0.0, min=0.0, max=100.0, step=0.01, optional=True,
                               tooltip="Weight of AdaLoRA's penalty ||U^T U - I|| + ||V V^T - I|| (mean over layers). "
                                       "0 (off) learns fastest; saved files are made orthonormal anyway."),
                io.Combo.Input(id="target_layers", options=list(TARGETS), default=DEFAULT_TARGET, optional=True,
                               tooltip="Which layers of the diffusion model get an adapter. attention includes "
                                       "fused layers that carry attention (a Flux single block's linear1 and "
                                       "linear2). Ignored when resuming."),
                file_choice("existing_lora", "Continue training this TriLoRA (or LoRA) file from the loras folder: "
                            "its layers, step count and, for a checkpoint, optimizer state. [None] starts fresh.",
                            none=True, optional=True),
                io.Int.Input(id="checkpoint_every", default=0, min=0, max=1_000_000, optional=True,
                             tooltip="Save a checkpoint (with optimizer state, for resuming) every N steps into the "
                                     "loras folder. 0 = off."),
                io.String.Input(id="checkpoint_prefix", default="trilora/checkpoints/trilora", optional=True,
                                tooltip="File name for checkpoints inside the loras folder; a counter and the step "
                                        "are added, nothing is replaced."),
                *family.inputs(),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The input model with the trained TriLoRA applied "
                                "(strength 1)."),
                TRILORA.Output(display_name="TRILORA", tooltip="The trained TriLoRA with its training record; "
                               "save it with Save TriLoRA or preview it with Apply TriLoRA."),
                LOSS_MAP.Output(display_name="LOSS_MAP", tooltip="Loss per step of this run, for Plot Loss Graph."),
                io.Int.Output(display_name="steps", tooltip="Total steps the TriLoRA has been trained for "
                              "(including a resumed file's)."),
            ],
        )

    @classmethod
    def validate_inputs(cls, existing_lora=None):
        return check_names(_one(existing_lora))

    @classmethod
    def fingerprint_inputs(cls, existing_lora=NONE_FILE, **_):
        return files_fingerprint(_one(existing_lora))

    @classmethod
    def execute(cls, model, latents, positive, steps=100, rank=DEFAULT_RANK, learning_rate=DEFAULT_LR, seed=0,
                alpha=DEFAULT_ALPHA, batch_size=1, training_dtype="bf16", gradient_checkpointing=True,
                grad_accumulation_steps=1, optimizer="AdamW", lr_schedule="constant", warmup_steps=0,
                loss_function="MSE", s_learning_rate_scale=DEFAULT_S_LR_SCALE, orthogonality_penalty=0.0,
                target_layers=DEFAULT_TARGET, existing_lora=NONE_FILE, checkpoint_every=0,
                checkpoint_prefix="trilora/checkpoints/trilora", timestep_sampling=AUTO, guidance=DEFAULT_GUIDANCE):
        args = TrainArgs(
            steps=int(_one(steps)), rank=int(_one(rank)), learning_rate=float(_one(learning_rate)),
            seed=int(_one(seed)), alpha=float(_one(alpha)), batch_size=int(_one(batch_size)),
            grad_accumulation_steps=int(_one(grad_accumulation_steps)), optimizer=_one(optimizer),
            lr_schedule=_one(lr_schedule), warmup_steps=int(_one(warmup_steps)), loss_function=_one(loss_function),
            s_learning_rate_scale=float(_one(s_learning_rate_scale)),
            orthogonality_penalty=float(_one(orthogonality_penalty)), target_layers=_one(target_layers),
            training_dtype=_one(training_dtype), gradient_checkpointing=bool(_one(gradient_checkpointing)),
            existing_lora=_one(existing_lora), checkpoint_every=int(_one(checkpoint_every)),
            checkpoint_prefix=_one(checkpoint_prefix), timestep_sampling=_one(timestep_sampling),
            guidance=float(_one(guidance)))
        args.check()
        model = _one(model)
        images, sources = split_latents(latents)
        entries, image_conds = split_conditioning(positive, len(images), sources)
        with torch.inference_mode(False), torch.enable_grad():
            trainer = train(args, model, images, entries, image_conds)
            layers = trainer.layers()
            trilora = TriLoRAFile(layers, trainer.metadata(trainer.total))
        out_model, _, _ = apply_trilora(model, None, layers, 1.0, 0.0, "TrainTriLoRA")
        return io.NodeOutput(out_model, trilora, {"loss": list(trainer.losses)}, trainer.total)


def train(args: TrainArgs, model, images, entries, image_conds,
          trainer_class: type[TriLoRATrainer] = TriLoRATrainer) -> TriLoRATrainer:
    """Trains on a clone of ``model``; returns the finished trainer (factors, losses).
    ``trainer_class``: a TriLoRATrainer subclass, e.g. the data-parallel one of the CLI."""
    mp = model.clone()
    mp.set_model_compute_dtype(TRAINING_DTYPES[args.training_dtype])
    settings = FamilySettings.resolve(mp, args.timestep_sampling, args.guidance, args.gradient_checkpointing)
    images = family.fit_latents([img.detach().clone().float() for img in images], mp)
    entries = settings.with_guidance([[cond.clone(), _clone_tree(extra)] for cond, extra in entries])
    if args.existing_lora in (NONE_FILE, "", None):
        targets = find_targets(mp, args.target_layers)
        if not targets:
            raise ValueError(f"TrainTriLoRA: target_layers {args.target_layers!r} selects no layer of this model; "
                             "choose 'all linear' or 'all linear+conv'")
        start = read_start(args, targets)
    else:
        targets, start = resume_start(args, mp)
    trainer = trainer_class(args, mp, targets, start, images, image_conds, base_model_metadata(mp), settings)
    comfy.model_management.load_models_gpu([mp], memory_required=1e20, force_full_load=True)
    guider = Guider_Basic(mp)
    guider.set_conds(entries)
    dummy = torch.zeros_like(images[0])
    ms = mp.get_model_object("model_sampling")
    sigmas = torch.tensor([float(ms.sigma_max), 0.0])
    guider.sample(dummy, dummy, TrainSampler(trainer), sigmas, seed=args.seed)
    return trainer


class ApplyTriLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ApplyTriLoRA",
            display_name="Apply TriLoRA",
            category="training",
            description="Applies an in-memory TriLoRA (e.g. straight from Train TriLoRA) to a diffusion model, to "
                        "preview it without saving.",
            inputs=[
                io.Model.Input(id="model", tooltip="The diffusion model the TriLoRA is applied to."),
                TRILORA.Input(id="trilora", tooltip="The TriLoRA, e.g. the TRILORA output of Train TriLoRA."),
                io.Float.Input(id="strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               display_mode=io.NumberDisplay.slider,
                               tooltip="How strongly to modify the diffusion model: 1.0 applies the TriLoRA as "
                                       "trained, 0 leaves the model untouched, negative values push the other way."),
            ],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="The diffusion model with the TriLoRA applied.")],
        )

    @classmethod
    def execute(cls, model, trilora, strength):
        if not isinstance(trilora, TriLoRAFile) or not trilora.layers:
            raise ValueError("ApplyTriLoRA: trilora holds no layers; connect the TRILORA output of Train TriLoRA")
        if strength == 0:
            return io.NodeOutput(model)
        out, _, _ = apply_trilora(model, None, trilora.layers, strength, 0.0, "TRILORA (in memory)")
        return io.NodeOutput(out)


NODES = [TrainTriLoRA, ApplyTriLoRA]
