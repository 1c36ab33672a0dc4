"""The training run: TriLoRATrainer runs the loop where a sampler would, inside ComfyUI's guider
(as ComfyUI's TrainLoraNode does), and ``train`` sets it up on a clone of the model.

Phases: ``train`` clones the model, fits the latents and conditioning to the family, finds the
target layers (or resumes a file) and loads the model; the guider prepares the conditioning and
calls TrainSampler, which calls ``TriLoRATrainer.run``: attach the adapters (targets.py), loop
over steps (each step: learning rate, micro-steps of forward and backward, all-reduce, penalty,
finiteness check, snapshot, optimizer update), write checkpoints, and detach everything in
``finally``. A loss that stops being finite or a step out of memory ends the run (failures.py).

The loss is taken in the model's own prediction space (epsilon, v, flow velocity ...): the
denoised error divided by the output's coefficient in model_sampling.calculate_denoised, so one
code path serves every family."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import sys

import comfy.model_management
import comfy.samplers
import comfy.utils
import torch
import tqdm

from ...trilora_core import (
    TriLoRAFile,
    TriLoRALayer,
    all_finite,
    banded,
    bucket_batch,
    canonicalize,
    generator,
    group_buckets,
    load_optimizer_state,
    loss_function,
    lr_lambda,
    make_optimizer,
    noise_level_weights,
    orthogonality_penalty,
    param_groups,
    sample_noise_levels,
)
from ..adapter import TriLoRATrainDiff
from ..families import base_model_metadata
from . import family, precision
from .batches import ForwardBatches, clone_tree
from .checkpoints import StartState, fresh, read_start, resume_start, run_metadata, write_checkpoint
from .config import NODE, TrainArgs
from .failures import LastGood, RunFailures, is_out_of_memory, memory_hints
from .family import FamilySettings
from .monitor import Monitor, MonitorData, monitor_inputs
from .parallel import OneProcess
from .rank_control import timestep_rank_masks
from .targets import attach, find_targets
from .text_encoder import CaptionEncoder, GivenCaptions, check_captions

try:  # ComfyUI's basic guider (cfg 1, positive only); the same class is rebuilt if it moves
    from comfy_extras.nodes_custom_sampler import Guider_Basic
except ImportError:  # pragma: no cover - depends on the ComfyUI version
    class Guider_Basic(comfy.samplers.CFGGuider):
        def set_conds(self, positive):
            self.inner_set_conds({"positive": positive})

log = logging.getLogger("comfyui-trilora")


def weighted_loss(loss_fn, kind: str, gamma: float, ms, sigma, coeff, err):
    """The loss of a forward group's own-space errors [n, ...], each sample weighted by its noise
    level (``kind``: the resolved loss_weighting; trilora_core/loss_weighting.py); 'none' is the plain loss."""
    if kind == "none":
        return loss_fn(err)
    one, zero = torch.ones_like(sigma), torch.zeros_like(sigma)
    weights = noise_level_weights(kind, ms.noise_scaling(sigma, zero, one, False),
                                  ms.noise_scaling(sigma, one, zero, False), coeff.flatten(1)[:, 0],
                                  gamma).to(err.device)
    return torch.stack([loss_fn(e) for e in err]).mul(weights).mean()


def low_vram_settings(base, settings: FamilySettings) -> FamilySettings:
    """Checkpointing on where ComfyUI offloaded part of the model (low VRAM): each offloaded weight
    is cast to the device per forward, and without checkpointing every such copy is kept for the
    backward pass."""
    if not getattr(base, "model_lowvram", False) or settings.checkpointing:
        return settings
    log.warning("TrainTriLoRA: the model is partially loaded (low VRAM), so gradient checkpointing is on")
    return dataclasses.replace(settings, checkpointing=True)


# What ComfyUI's own trainer (TrainLoraNode) sets in comfy.model_management while its loop runs.
# in_training: ComfyUI 0.33's models then take their differentiable paths (rope and norms without
# comfy_kitchen's fused kernels, which have no backward). training_fp8_bwd off: quantized layers
# take their backward in the compute dtype, whatever a TrainLoraNode run with quantized_backward left.
TRAINING_FLAGS = {"in_training": True, "training_fp8_bwd": False}
_ABSENT = object()


@contextlib.contextmanager
def training_flags():
    """Sets TRAINING_FLAGS (also in a ComfyUI that has none yet, where nothing reads them) and
    restores each one on every way out: done, cancel (a BaseException in ComfyUI 0.33), error."""
    mm = comfy.model_management
    before = {name: getattr(mm, name, _ABSENT) for name in TRAINING_FLAGS}
    for name, value in TRAINING_FLAGS.items():
        setattr(mm, name, value)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is _ABSENT:
                delattr(mm, name)
            else:
                setattr(mm, name, value)


def buckets_of(images, batch_size: int) -> list[list[int]]:
    """The images of each bucket (latent size); logs the buckets that hold fewer images than a
    batch: their batches are smaller, as kohya's are, and a one-image bucket always trains alone."""
    buckets = group_buckets([tuple(image.shape) for image in images])
    for items in buckets if len(buckets) > 1 else ():
        if len(items) < batch_size:
            height, width = images[items[0]].shape[-2:]
            size = f"{width} x {height} latents (width x height, as Load Training Images names buckets)"
            log.warning("TriLoRA: the bucket of %s holds %d image%s (image %s); its batches hold %d, "
                        "not batch_size %d", size, len(items), "s" if len(items) > 1 else "",
                        ", ".join(str(i + 1) for i in items), len(items), batch_size)
    return buckets


class TriLoRATrainer:
    """One training run; `run` is called by the sampler inside ComfyUI's guider. ``parallel``: how
    the run shares its work between processes (parallel.py; alone by default)."""

    def __init__(self, args: TrainArgs, model_patcher, targets, start: StartState, images, image_conds,
                 base_meta: dict, settings: FamilySettings, parallel: OneProcess | None = None,
                 monitor: Monitor | None = None, text: CaptionEncoder | None = None):
        self.args, self.mp, self.targets, self.start = args, model_patcher, targets, start
        self.parallel, self.text = parallel or OneProcess(), text or GivenCaptions()  # text: each step's captions
        self.monitor = monitor or Monitor(args, MonitorData(), list)
        self.images, self.image_conds = images, image_conds
        self.processed: list = []  # the guider's processed cond entries, in input order
        self.batches, self.settings = ForwardBatches(images, image_conds, args.seed), settings
        self.base_meta = {**base_meta, **settings.metadata()}
        self.dtype, self.device = precision.autocast_dtype(args, model_patcher), model_patcher.load_device
        self.batch = min(args.batch_size, len(images))
        self.buckets = buckets_of(images, args.batch_size)  # a batch draws from one
        self.loss_fn = functools.partial(weighted_loss, loss_function(args.loss_function), settings.loss_weighting,
                                         args.min_snr_gamma)  # (model_sampling, sigma, coeff, error) -> loss
        self.total = start.step + args.steps
        self.losses, self.checkpoints = [], []  # the loss per step, the files written
        self.adapters, self.groups, self.optimizer = make_factors(args, targets, self.text, start, self.device)
        self.params = [p for g in self.groups for p in g["params"]]
        self.step = self.done = start.step  # the step under way; the updates completed
        self.schedule = lr_lambda(args.lr_schedule, self.total, args.warmup_steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.last_good = LastGood(self.params, start.step)
        self.failures = run_failures(self)
        self.parallel.start(self)

    # ---- one micro-step: forward and backward, returns the loss as a float

    def _micro(self, model_wrap, extra_args, step: int, micro: int) -> float:
        ms = model_wrap.inner_model.model_sampling
        batch = bucket_batch(self.args.seed, self.buckets, self.args.batch_size, step * self.args.grad_accumulation_steps + micro)
        gen = generator(self.args.seed, "noise", step, micro)
        levels = sample_noise_levels(self.settings.timestep_sampling, len(batch), gen)
        noises = [torch.randn(self.images[i].shape, generator=gen) for i in batch]
        sigmas = [float(ms.percent_to_sigma(1.0 - float(t))) for t in levels]  # percent 0: the most noise
        autocast = torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)
        total = 0.0
        for positions, conds in self.text.groups(batch, self.parallel.share(len(batch)), step, micro):
            x0 = torch.cat([self.images[batch[p]] for p in positions])
            noise = torch.cat([noises[p] for p in positions]).to(self.device)
            sigma = torch.tensor([sigmas[p] for p in positions], device=self.device, dtype=torch.float32)
            xt = ms.noise_scaling(sigma, noise, x0, False)
            target = ms.noise_scaling(torch.zeros_like(sigma), torch.zeros_like(noise), x0, False)
            model_wrap.conds["positive"] = conds
            with timestep_rank_masks(self.args.timestep_min_rank, self.adapters, self.targets, levels, positions):
                with autocast:
                    denoised = model_wrap(xt, sigma, **extra_args)
                # The model's output enters calculate_denoised linearly: its coefficient turns the
                # denoised error back into the error of the model's own prediction (eps, v, flow...).
                coeff = ms.calculate_denoised(sigma, torch.ones_like(x0), torch.zeros_like(x0))
                loss = self.loss_fn(ms, sigma, coeff, (denoised.float() - target) / coeff)
                weight = len(positions) / len(batch)
                self.scaler.scale(loss * (weight / self.args.grad_accumulation_steps)).backward()
            total += float(loss.detach()) * weight
        return total

    # ---- the loop

    def run(self, model_wrap, extra_args) -> None:
        self.processed = model_wrap.conds["positive"]
        base = model_wrap.inner_model
        self.images = [img.to(self.device) for img in self.images]
        self.images = [base.process_latent_in(img) for img in self.images]
        self.batches.start(base, self.processed, self.images, self.device)
        self.monitor.start(base, self.processed, self.device, self.batches)
        self.settings = low_vram_settings(base, self.settings)
        att = attach(base.diffusion_model, self.targets, self.adapters, self.settings.checkpointing)
        try:
            self.text.start(base, self.processed, self.batches, self.adapters, att)
            with training_flags():
                self._loop(model_wrap, extra_args)
            self.parallel.finish()
        except BaseException as err:  # a cancel too: data-parallel ranks must learn of it
            self.parallel.failed(err)
        finally:
            att.detach()  # the text encoders' too
            model_wrap.conds["positive"] = self.processed
            self.optimizer.zero_grad(set_to_none=True)

    def _loop(self, model_wrap, extra_args) -> None:
        args = self.args
        pbar = comfy.utils.ProgressBar(args.steps)
        text = _progress_text_sender()
        console = tqdm.trange(args.steps, desc="Training TriLoRA", disable=not comfy.utils.PROGRESS_BAR_ENABLED)
        self.failures.measuring(self.start.step, self.monitor.begin, self, model_wrap, extra_args)
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
                self.failures.out_of_memory(step + 1, oom)
            self.losses.append(loss)
            if k == 0:
                warn_unused(self.adapters)
            console.set_postfix({"loss": f"{loss:.4f}"})
            pbar.update_absolute(k + 1, args.steps)
            text(f"step {step + 1}/{self.total}  loss {loss:.4f}")
            if args.checkpoint_every and (step + 1) % args.checkpoint_every == 0:
                self.checkpoints.append(self.write_checkpoint(step + 1))
            if self.failures.measuring(step + 1, self.monitor.after_step, self, model_wrap, extra_args, k, k == args.steps - 1):
                break  # early stop
        if not all_finite(self.params):
            self.failures.diverged(self.total, "the adapter's factors are not finite after the last update")
        self.total = self.failures.total = self.monitor.finish(self, self.start.step + len(self.losses))

    def _step(self, model_wrap, extra_args, step: int) -> float:
        """One optimizer update; returns its loss."""
        args = self.args
        self.step = step
        factor = self.schedule(step)
        for group in self.groups:
            group["lr"] = group["base_lr"] * factor
        loss = 0.0
        for micro in range(args.grad_accumulation_steps):
            comfy.model_management.throw_exception_if_processing_interrupted()
            micro_loss = self._micro(model_wrap, extra_args, step, micro)
            if not math.isfinite(micro_loss):
                self.failures.diverged(step + 1, f"the loss is not finite ({micro_loss})")
            loss += micro_loss / args.grad_accumulation_steps
        loss = self.parallel.all_reduce(loss)
        if args.orthogonality_penalty > 0:
            penalty = torch.stack([orthogonality_penalty(a.trilora_u, a.trilora_vt)
                                   for a in self.adapters.values()]).mean()
            self.scaler.scale(penalty * args.orthogonality_penalty).backward()
        self.scaler.unscale_(self.optimizer)
        if self.dtype != torch.float16 and not all_finite(p.grad for p in self.params):
            self.failures.diverged(step + 1, "the gradients are not finite")
        self.last_good.take(step)  # the factors that gave this finite loss
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.done = step + 1
        self.parallel.step_done(step)
        return loss

    # ---- results

    def layers(self, canonical: bool = True) -> dict[str, TriLoRALayer]:
        """The factors now, float32 on the CPU, canonical unless asked otherwise."""
        return {prefix: adapter_layer(adapter, canonical, self.args.timestep_min_rank)
                for prefix, adapter in self.adapters.items()}

    def metadata(self, steps_done: int) -> dict[str, str]:
        meta = run_metadata(self.args, self.start, self.losses, len(self.images), self.base_meta, steps_done)
        return {**meta, **self.parallel.metadata(self.args), **self.monitor.metadata()}

    def write_checkpoint(self, steps_done: int, suffix: str = "", with_optimizer: bool = True) -> str:
        if not self.parallel.writes_files:
            return "(rank 0's folder)"
        adapter = TriLoRAFile(self.layers(), self.metadata(steps_done))
        return write_checkpoint(self.args, adapter, steps_done, suffix, self.optimizer if with_optimizer else None)


def run_failures(run: TriLoRATrainer) -> RunFailures:
    """The run's endings, given what they read: its last good factors, optimizer, checkpoint
    writer, settings and where it started."""
    return RunFailures(run.last_good, run.optimizer, run.write_checkpoint, run.args.learning_rate, run.dtype,
                       run.device, run.total, run.start.step, run.start.source, before_save=run.parallel.saving,
                       memory_hints=lambda: memory_hints(run.batch, run.settings.checkpointing, run.dtype,
                                                         precision.can_offload(run.args, run.device)))


def warn_unused(adapters: dict) -> None:
    # A model that calls F.linear on a layer's weight directly skips the layer's hooks.
    unused = sorted(p for p, a in adapters.items() if a.calls == 0)
    if unused:
        log.warning("TriLoRA: %d adapted layers never ran in the forward pass and will not learn "
                    "(first: %s)", len(unused), unused[0])


def make_adapters(targets, layers: dict[str, TriLoRALayer], device) -> dict[str, TriLoRATrainDiff]:
    """{prefix: trainable adapter} on ``device``, from each target's start layer."""
    adapters = {}
    for target in targets:
        layer = layers[target.prefix]
        vt = layer.vt.reshape(layer.rank, *target.weight_shape[1:])
        adapter = TriLoRATrainDiff(layer.u, layer.s, vt, layer.alpha)
        adapters[target.prefix] = adapter.to(device)
    return adapters


def make_factors(args: TrainArgs, targets, text: GivenCaptions, start: StartState, device):
    """(adapters by prefix, param groups, optimizer) of the diffusion model's ``targets`` and the text
    encoders' (``text.targets``: groups of their own at text_encoder_lr) from the start layers, with
    a resumed optimizer state where it fits."""
    adapters = make_adapters(targets + text.targets, start.layers, device)
    shapes = {t.prefix: t.weight_shape for t in targets + text.targets}

    def groups_of(chosen, lr: float) -> list[dict]:
        factors = {t.prefix: (adapters[t.prefix].trilora_u, adapters[t.prefix].trilora_s, adapters[t.prefix].trilora_vt)
                   for t in chosen}
        return param_groups(factors, shapes, lr, args.s_learning_rate_scale)

    groups = groups_of(targets, args.learning_rate) + (groups_of(text.targets, args.text_encoder_lr)
                                                       if text.targets else [])
    optimizer = make_optimizer(args.optimizer, groups)
    if start.optimizer_tensors is not None:
        try:
            load_optimizer_state(optimizer, start.optimizer_tensors)
        except ValueError as err:
            log.warning("TriLoRA: optimizer state not restored: %s", err)
    return adapters, groups, optimizer


def adapter_layer(adapter, canonical: bool = True, timestep_min_rank: int = 0) -> TriLoRALayer:
    """The factors, float32 on the CPU; canonical: in canonical form, per band of T-LoRA's
    schedule with ``timestep_min_rank`` (the bands the mask trained, kept apart: banded)."""
    layer = TriLoRALayer(adapter.trilora_u.detach().float().cpu().clone(),
                         adapter.trilora_s.detach().float().cpu().clone(),
                         adapter.trilora_vt.detach().float().cpu().clone(), float(adapter.alpha))
    if canonical and timestep_min_rank:
        return banded(layer, timestep_min_rank)
    return canonicalize(layer) if canonical else layer


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



def train(args: TrainArgs, model, images, entries, image_conds, parallel: OneProcess | None = None,
          select_targets=find_targets, listeners=(), clip=None, captions=None, **validation) -> TriLoRATrainer:
    """Trains on a clone of ``model``; returns the finished trainer (factors, losses, curves).
    ``parallel``: how the run is shared between processes (the CLI's DataParallel; alone by default);
    ``select_targets(model_patcher, target_layers)``: the layers a fresh run adapts;
    ``listeners``: called with (step, {name: value}) for each step's loss and each evaluation;
    ``clip``, ``captions`` (one per image): the text encoder and captions a run encodes at every step
    (text_encoder_lr, caption_dropout_rate, shuffle_caption), checked before anything loads;
    ``validation``: validation_latents, validation_positive, preservation (monitor.monitor_inputs)."""
    captions = check_captions(args, clip, captions, len(images))
    images, image_conds, entries, data = monitor_inputs(args, images, entries, image_conds, **validation)
    precision.check_base(args, model)
    mp = model.clone()
    text = None if captions is None else CaptionEncoder(args, clip, captions, mp.load_device)
    if text:
        text.keep(data.held_out)
        text.check_fits(entries, image_conds)
    precision.set_compute_dtype(args, mp)
    settings = FamilySettings.resolve(mp, args.timestep_sampling, args.guidance, args.gradient_checkpointing,
                                      args.loss_weighting)
    images = family.fit_latents([img.detach().clone().float() for img in images], mp)
    entries = settings.with_guidance([[cond.clone(), clone_tree(extra)] for cond, extra in entries])
    if fresh(args):
        targets = select_targets(mp, args.target_layers)
        if not targets:
            raise ValueError(f"{NODE}: target_layers {args.target_layers!r} selects no layer of this model; "
                             "choose 'all linear' or 'all linear+conv'")
        start = read_start(args, targets)
    else:
        targets, start = resume_start(args, mp, keep_text_encoders=bool(text and text.trains))
    if text:
        start.layers.update(text.start_layers(start.text_layers))
    monitor = Monitor(args, data, lambda latents: family.fit_latents([x.detach().clone().float() for x in latents], mp),
                      listeners)
    trainer = TriLoRATrainer(args, mp, targets, start, images, image_conds, base_model_metadata(mp), settings,
                             parallel, monitor, text)
    precision.load(args, mp)
    guider = Guider_Basic(mp)
    guider.set_conds(entries)
    dummy = torch.zeros_like(images[0])
    ms = mp.get_model_object("model_sampling")
    sigmas = torch.tensor([float(ms.sigma_max), 0.0])
    guider.sample(dummy, dummy, TrainSampler(trainer), sigmas, seed=args.seed)
    return trainer

