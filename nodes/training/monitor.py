"""What a run is measured by while it trains (trilora_core.validation holds the math): the held-out
images (a seeded validation_split of the training images, or validation LATENT/CONDITIONING
inputs), the preservation prompts whose base drift is measured, and the evaluations every
validate_every steps, with keep_best and early stopping.

An evaluation scores the held-out images at fixed noise levels with fixed noise (validation_plan:
about max(images, VALIDATION_LEVELS) samples, every level scored, forwards of at most batch_size
samples, as training's, so an evaluation needs no more memory; no gradient): the model's own objective (MSE of its eps / v / flow prediction) and the
x0 error, each the mean over the samples. Drift is the mean squared change of the prediction for
each preservation prompt, on the smallest training latent noised the same way, against the base
model's prediction, which is computed once with the adapters switched off (s = 0), so a resumed
run measures drift against the untouched base too.

Preservation prompts from CONDITIONING alone: a caption cannot be re-encoded without its trigger
word here, so by default the only one is the first caption zeroed out (ComfyUI's
ConditioningZeroOut, the "empty" prompt of Flux / SD3 graphs); connect a `preservation`
CONDITIONING (e.g. CLIP Text Encode of "" and of the captions without the trigger word) for
others. The command line encodes the empty prompt with the checkpoint's text encoder."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import torch

from ...trilora_core import (
    BestStep,
    holdout_split,
    prediction_drift,
    prediction_errors,
    validation_levels,
    validation_noise,
    validation_plan,
)
from .batches import ForwardBatches, split_conditioning, split_latents
from .config import NODE, TrainArgs
from .preview import Previews

log = logging.getLogger("comfyui-trilora")

CURVES_KEY = "trilora_curves"
CURVE_NAMES = ("heldout", "heldout_x0", "drift", "drift_x0")


@dataclass
class MonitorData:
    """The held-out latents ([1, C, ...] each, not yet fitted to the family), the cond entry
    indices each one uses, and the entry indices of each preservation prompt."""

    images: list = field(default_factory=list)
    image_conds: list = field(default_factory=list)
    preserve: list = field(default_factory=list)
    held_out: list = field(default_factory=list)  # which input images validation_split took


def zero_out(entry):
    """A cond entry as ComfyUI's ConditioningZeroOut makes it: zero tensors, pooled output zeroed."""
    cond, extra = entry
    extra = dict(extra)
    if isinstance(extra.get("pooled_output"), torch.Tensor):
        extra["pooled_output"] = torch.zeros_like(extra["pooled_output"])
    return [torch.zeros_like(cond), extra]


def _check_like(images: list, reference, what: str) -> None:
    for n, img in enumerate(images):
        if img.ndim != reference.ndim or img.shape[1] != reference.shape[1]:
            raise ValueError(f"{NODE}: {what} image {n + 1} has shape {list(img.shape)}: {img.shape[1]} channels in "
                             f"{img.ndim - 2} spatial dims, but the training latents have {reference.shape[1]} in "
                             f"{reference.ndim - 2}; encode it with the same VAE")


def monitor_inputs(args: TrainArgs, images, entries, image_conds, validation_latents=None,
                   validation_positive=None, preservation=None):
    """(training images, their cond indices, cond entries, MonitorData): validation_split's images
    moved out of training, validation inputs and preservation prompts checked and added to the
    entries. Raises ValueError naming the input before any step runs."""
    try:
        keep, held = holdout_split(len(images), args.validation_split, args.seed)
    except ValueError as err:
        raise ValueError(f"{NODE}: {err}") from None
    data = MonitorData([images[i] for i in held], [image_conds[i] for i in held], held_out=held)
    images, image_conds, entries = [images[i] for i in keep], [image_conds[i] for i in keep], list(entries)
    if validation_latents is not None:
        _add_validation(data, entries, images[0], validation_latents, validation_positive)
    if preservation is not None:
        _add_preservation(data, entries, preservation)
    else:
        data.preserve.append((len(entries),))
        entries.append(zero_out(entries[image_conds[0][0]]))
    if args.keep_best != "off" and not data.images:
        raise ValueError(f"{NODE}: keep_best {args.keep_best!r} needs held-out images: set validation_split above 0 "
                         "or connect validation_latents and validation_positive")
    if args.keep_best != "off" and args.validate_every == 0:
        raise ValueError(f"{NODE}: keep_best {args.keep_best!r} chooses among evaluations, but validate_every is 0 "
                         "(off); set it to the interval between evaluations")
    if args.early_stop_evaluations and args.keep_best == "off":
        raise ValueError(f"{NODE}: early_stop_evaluations stops when keep_best finds no better step; choose a "
                         "keep_best other than 'off' or set it to 0")
    if args.validation_split > 0 and args.validate_every == 0:
        log.warning("%s: validation_split %g holds images out of training, but validate_every is 0, so they are "
                    "never scored; set validate_every, or validation_split 0 to train on every image",
                    NODE, args.validation_split)
    return images, image_conds, entries, data


def _add_validation(data: MonitorData, entries: list, reference, latents, positive) -> None:
    try:
        if positive is None:
            raise ValueError("validation_positive is missing; connect the captions of validation_latents")
        extra, sources = split_latents(latents)
        more, conds = split_conditioning(positive, len(extra), sources)
    except ValueError as err:
        raise ValueError(f"{NODE}: validation_latents / validation_positive: "
                         f"{str(err).removeprefix(NODE + ': ')}") from None
    _check_like(extra, reference, "validation_latents")
    data.images += extra
    data.image_conds += [tuple(j + len(entries) for j in c) for c in conds]
    entries += more


def _add_preservation(data: MonitorData, entries: list, preservation) -> None:
    """Each CONDITIONING of the input (a list, as is_input_list hands it) is one prompt."""
    single = bool(preservation) and isinstance(preservation[0], (list, tuple)) and \
        isinstance(preservation[0][0], torch.Tensor)
    for prompt in [preservation] if single else preservation:
        try:
            more, _ = split_conditioning(prompt, 1, [0])
        except ValueError as err:
            raise ValueError(f"{NODE}: preservation: {str(err).removeprefix(NODE + ': ')}") from None
        data.preserve.append(tuple(range(len(entries), len(entries) + len(more))))
        entries += more


class Monitor:
    """The evaluations of one run; the trainer calls ``start`` once the guider has run, then
    ``after_step`` after every update, and ``finish`` at the end."""

    def __init__(self, args: TrainArgs, data: MonitorData, fit, listeners=()):
        self.args, self.data = args, data
        self.listeners = list(listeners)  # called with (step, {name: value}) per step and per evaluation
        self.previews = Previews(args.preview_every, args.steps, self.listeners)
        self.images = fit(list(data.images)) if data.images else []
        self.levels = validation_levels()
        self.rows: list[dict] = []
        self.best = BestStep(args.keep_best, args.max_drift, args.early_stop_evaluations)
        self.best_params = None
        self.base = None  # the base model's drift predictions, once computed
        self.noise: dict = {}

    @property
    def active(self) -> bool:
        return self.args.validate_every > 0 and bool(self.data.images or self.data.preserve)

    def start(self, base, processed, device, train: ForwardBatches) -> None:
        """Once the guider has run: ``train`` holds the training latents (on the device) and their
        processed conds. Drift and previews use the smallest training latent (the first of them)."""
        self.device = device
        first = min(range(len(train.images)), key=lambda i: train.images[i].numel())
        self.previews.start(base, [train.processed_for(first)[j] for j in train.image_conds[first]], device,
                            tuple(train.images[first].shape))
        self.images = [base.process_latent_in(img.to(device)) for img in self.images]
        self.batches = ForwardBatches(self.images, self.data.image_conds, self.args.seed)
        self.batches.start(base, processed, self.images, device, tuple(train.images[0].shape))
        self.drift_x0 = train.images[first]
        self.drift_conds = [[train.processed_for(first)[j] for j in prompt] for prompt in self.data.preserve]
        self.plan = {"heldout": validation_plan(len(self.images)), "drift": validation_plan(len(self.drift_conds))}

    def _predict(self, trainer, model_wrap, extra_args, x0, conds, purpose: str, item: int):
        """(denoised, x0, coeff) for ``x0`` at its planned levels, in one forward without gradient."""
        ms = model_wrap.inner_model.model_sampling
        levels = self.plan[purpose][item]
        key = (purpose, item)
        if key not in self.noise:
            self.noise[key] = torch.cat([validation_noise(x0.shape, purpose, item, n) for n in levels])
        noise = self.noise[key].to(self.device)
        sigma = torch.tensor([float(ms.percent_to_sigma(1.0 - self.levels[n])) for n in levels], device=self.device)
        x0 = x0.repeat(len(levels), *([1] * (x0.ndim - 1)))
        model_wrap.conds["positive"] = conds
        autocast = torch.autocast(self.device.type, dtype=trainer.dtype, enabled=trainer.dtype != torch.float32)
        xt, chunk = ms.noise_scaling(sigma, noise, x0, False), trainer.batch  # no larger than training's forward
        with torch.no_grad(), autocast:
            denoised = torch.cat([model_wrap(xt[i:i + chunk], sigma[i:i + chunk], **extra_args).float()
                                  for i in range(0, len(levels), chunk)])
        return denoised, x0, ms.calculate_denoised(sigma, torch.ones_like(x0), torch.zeros_like(x0))

    def _base_predictions(self, trainer, model_wrap, extra_args) -> list:
        """The untouched base's drift predictions: every adapter's s set to 0 for the forward."""
        with torch.no_grad():
            saved = [a.trilora_s.detach().clone() for a in trainer.adapters.values()]
            for a in trainer.adapters.values():
                a.trilora_s.zero_()
            try:
                return [self._predict(trainer, model_wrap, extra_args, self.drift_x0, conds, "drift", p)[0]
                        for p, conds in enumerate(self.drift_conds)]
            finally:
                for a, s in zip(trainer.adapters.values(), saved, strict=True):
                    a.trilora_s.copy_(s)

    def evaluate(self, trainer, model_wrap, extra_args, steps_done: int) -> dict:
        """One row of the curves: held-out errors (None without held-out images) and drift."""
        if self.base is None:
            self.base = self._base_predictions(trainer, model_wrap, extra_args)
        row = {"step": steps_done}
        if self.images:
            errs = [prediction_errors(*self._predict(trainer, model_wrap, extra_args, img,
                                                     self.batches.conds_for([i]), "heldout", i))
                    for i, img in enumerate(self.images)]
            row["heldout"] = float(torch.cat([e[0] for e in errs]).mean())  # the mean over the samples
            row["heldout_x0"] = float(torch.cat([e[1] for e in errs]).mean())
        drifts = []
        for p, conds in enumerate(self.drift_conds):
            denoised, _, coeff = self._predict(trainer, model_wrap, extra_args, self.drift_x0, conds, "drift", p)
            drifts.append(prediction_drift(denoised, self.base[p], coeff))
        if drifts:
            row["drift"] = float(torch.cat([d[0] for d in drifts]).mean())
            row["drift_x0"] = float(torch.cat([d[1] for d in drifts]).mean())
        self.rows.append(row)
        self.tell(steps_done, {k: v for k, v in row.items() if k != "step"})
        if self.best.update(steps_done, row.get("heldout"), row.get("drift")):
            self.best_params = [p.detach().clone() for p in trainer.params]
        log.info("TriLoRA step %d: %s", steps_done, "  ".join(f"{k} {v:.5g}" for k, v in row.items() if k != "step"))
        return row

    def begin(self, trainer, model_wrap, extra_args) -> None:
        """The first evaluation, where the curves start: the adapter before this run's first step."""
        if self.active:
            self.evaluate(trainer, model_wrap, extra_args, trainer.start.step)

    def tell(self, step: int, values: dict) -> None:
        for listener in self.listeners:
            listener(step, values)

    def after_step(self, trainer, model_wrap, extra_args, k: int, last: bool) -> bool:
        """After the run's (k+1)-th update: the loss to the listeners, a preview and an evaluation
        when due (evaluations every validate_every steps and at the last); True to stop early."""
        steps_done = trainer.start.step + k + 1
        self.tell(steps_done, {"loss": trainer.losses[-1]})
        self.previews.after_step(trainer, model_wrap, extra_args, k, steps_done)
        if not self.active:
            return False
        if steps_done % self.args.validate_every == 0 or last:
            self.evaluate(trainer, model_wrap, extra_args, steps_done)
            if self.best.stop and not last:
                log.info("TriLoRA: no better held-out error in %d evaluations; stopping early at step %d (best: "
                         "step %d)", self.best.patience, steps_done, self.best.step)
                return True
        return False

    def finish(self, trainer, steps_done: int) -> int:
        """Puts the kept step's factors into the adapters (keep_best); returns the step they belong to."""
        if self.best_params is None or self.best.step == steps_done:
            return steps_done
        with torch.no_grad():
            torch._foreach_copy_(trainer.params, self.best_params)
        log.info("TriLoRA: keeping the adapter of step %d (keep_best %s)", self.best.step, self.args.keep_best)
        return self.best.step

    # ---- what the user sees

    def curves(self) -> dict:
        """The evaluations as LOSS_MAP curves: eval_steps and one list per measure (None where
        not measured), and best_step (None unless keep_best chose one)."""
        out = {"eval_steps": [r["step"] for r in self.rows]}
        for name in CURVE_NAMES:
            if any(name in r for r in self.rows):
                out[name] = [r.get(name) for r in self.rows]
        out["best_step"] = self.best.step if self.args.keep_best != "off" else None
        return out

    def metadata(self) -> dict[str, str]:
        if not self.rows:
            return {}
        return {CURVES_KEY: json.dumps({k: ([float(f"{x:.6g}") if isinstance(x, float) else x for x in v]
                                            if isinstance(v, list) else v) for k, v in self.curves().items()})}
