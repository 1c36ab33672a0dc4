#!/usr/bin/env python
"""`make bench-method`: does TriLoRA keep its promise over LoRA on equal terms? Less drift of the
base model and no larger generalisation gap at every level of fit, measured on pretrained tiny
models in the real ComfyUI, in eps and in x0 error.

1. Base models: SD1.5-shaped (ComfyUI's own SD15 config and BaseModel: eps prediction, its noise
   schedule, CLIP-L-sized context, its LoRA key map) with the one-level UNet of the test fixture
   (harness/fixtures/tiny.py), at two widths (64 and 32 channels instead of 320; GroupNorm's 32 groups set the step), each
   pretrained here in latent space from a fixed seed on its own procedural captioned classes
   (b64: stripes, blobs, checks, ramps ...; b32: waves, dots, diamonds, bars ...; each class its own
   colour mix and a fixed random caption embedding shaped like CLIP-L's output). Cached in
   bench_output/method/, so the second run starts at once.
2. Personalisation: 4 pictures of a style the base never saw (b64: rings, b32: spirals; a new
   colour mix and caption), trained by three sides from the same data, rank, steps and seed, all
   called in-process as ComfyUI's executor calls them (under torch.inference_mode), fp32:
   - ours: TrainTriLoRA at its defaults (or --ours overrides) at a few learning rates (the
     default times cfg["lr_ours"]);
   - lora: ComfyUI's TrainLoraNode restricted to the SAME layers as TrainTriLoRA's target_layers
     (its own LoRA adapter, init, optimizer and x0 loss; every other weight, bias and norm is left
     alone) at a few learning rates (cfg["lr_lora"]);
   - theirs: TrainLoraNode at its defaults (every weight plus every bias and norm, lr 5e-4).
3. At checkpoints (ComfyUI's progress hook, which both nodes drive once per optimizer step) the
   model being trained is measured on fixed noise at 5 fixed noise levels: train error (the 4
   pictures), held-out error (8 other pictures of the style: the fit that matters) and base drift
   (mean squared change of the prediction on 2 pictures of each base class with its caption),
   each as the model's own eps error and as x0 error (the denoised image's, which weighs the
   noisiest levels by sigma^2, as TrainLoraNode's loss does).
4. The frontier claim, per base, rank, seed and error space: along each side's curves (every
   learning rate, linear between checkpoints) the least drift and the least gap growth with which
   it reaches a held-out level; at held-out levels 1/4, 1/2, 3/4 and all of the way from the base
   model's error to the best level BOTH sides reach, ours drifts <= 0.7x lora and its gap growth
   is no larger.
5. The defaults' goals, per base, rank and seed: held-out x0 error never above the base model's
   (at any checkpoint) and at the last step no worse than TrainLoraNode's; drift at matched
   held-out eps fit <= 0.7x lora's frontier (its best learning rate there); issue 19's goal
   against TrainLoraNode at its defaults (reach its held-out fit, gap growth no larger, drift at
   matched held-out fit <= 0.7x).
6. The thread check: the last base, rank and seed's default run and one LoRA run again with 2
   torch threads (a subset: every other run has 1); the largest relative change of any measured
   figure is reported, and whether any verdict changes.
7. The picture-level base ("drawing"): the drawing model `make setup` builds, personalised on the
   demo's 8 sample pictures (a thick black frame) and measured on pictures it generates
   (harness/bench_pictures.py): style fit = the held-out style prompts' frame contrast against the
   sample pictures', drift = the change in pixels of the base prompts' pictures, content = the large
   shape's colour. Its own smaller grid (cfg["pictures"]: ranks 4 and 16, seeds 0 and 1, 100 steps,
   TrainTriLoRA at 0.5x and 1x its learning rate, LoRA on the same layers at three; no
   TrainLoraNode-on-every-layer side): a run costs ~7x a latent one. The frontier claim in that
   space, and the defaults' goals there: the frame visible on held-out prompts at the last step,
   drift at the defaults' best style fit <= 0.7x LoRA's least there.

The runs are shared among --workers processes (default 2) of --threads torch threads (default 1):
each run is seeded and starts from the base model's file, so the numbers do not depend on the
number of workers or which worker ran what (tests/comfy/test_bench_method_smoke.py checks it).

    .venv/bin/python scripts/bench_method.py           # full run (make bench-method)
    .venv/bin/python scripts/bench_method.py --quick   # smoke run (tests/comfy/test_bench_method_smoke.py)
    .venv/bin/python scripts/bench_method.py --bases b64 --ranks 4 --seeds 0 --ours loss_weighting=min_snr --label x
                                                       # an experiment: lora's and theirs' runs come from the cache

Results: bench_output/method/<label>-<time>.json and .md, latest.json and latest.md for the full bench (latest-<label>.*
for another --label or --quick; --out to change).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import hashlib
import inspect
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: harness
from harness import COMFY_VERSION, REPO  # noqa: E402
from harness.bench import BenchHost as Host  # noqa: E402
from harness.bench import machine_info  # noqa: E402
from harness.host import as_loader_made  # noqa: E402
from harness.method_frontier import (  # noqa: E402
    FIT_FRACTIONS,
    GOAL_DRIFT_RATIO,
    PICTURE_SPACE,
    SIDES,
    SPACES,
    add_gaps,
    decide,
    decide_pictures,
)

SCHEMA_VERSION = 2
LEVELS = (0.1, 0.3, 0.5, 0.7, 0.9)  # fixed noise levels, as ComfyUI's timestep percent

BASES = {
    "b64": {"channels": 64, "kinds": ("stripes_h", "stripes_d", "blobs", "checks", "ramp", "stripes_v"),
            "style": "rings", "seed": 20261130},
    "b32": {"channels": 32, "kinds": ("waves", "dots", "diamond", "bars", "cross", "smooth"),
            "style": "spiral", "seed": 20261206},
    # The picture-level base: the drawing model make setup builds (harness/bench_pictures.py).
    "drawing": {"pictures": True, "channels": 320, "kinds": ("flat shapes on plain backgrounds",),
                "style": "the sample style's thick black frame"},
}
FULL = {
    "bases": ["b64", "b32", "drawing"],
    "latent": 8,              # latent side (64 px): the UNet has one level, 64 tokens
    "pretrain_steps": 600,
    "pretrain_batch": 16,
    "pretrain_lr": 1e-3,
    "pictures_per_class": 64,  # pretraining pool per base class
    "train_pictures": 4,
    "heldout_pictures": 8,
    "base_pictures": 2,       # per base class, for the drift measurement
    "steps": 200,
    "checkpoints": [25, 50, 100, 200, 400],
    "ranks": [4, 16],
    "seeds": [0, 1, 2, 3, 4],
    "lr_ours": [0.5, 1.0, 2.0],       # times TrainTriLoRA's learning_rate (its default or --ours)
    "lr_lora": [1e-3, 3e-3, 1e-2],    # TrainLoraNode on the same layers
    "thread_check": True,
    # The drawing model costs ~6x a latent run per step and sampling pictures at each checkpoint:
    # fewer runs (its own ranks, seeds, learning rates), 100 steps (the defaults fit the frame by
    # step 50 and overshoot it by 200), no TrainLoraNode-on-every-layer side.
    "pictures": {"ranks": [4, 16], "seeds": [0, 1], "steps": 100, "checkpoints": [25, 50, 100],
                 "lr_ours": [0.5, 1.0], "lr_lora": [1e-3, 3e-3, 1e-2], "sides": ["ours", "lora"],
                 "sample_steps": 6, "prompts": [3, 2, 3]},
}
QUICK = {**FULL, "bases": ["b64", "drawing"], "latent": 4, "pretrain_steps": 3, "pretrain_batch": 4, "pictures_per_class": 2,
         "heldout_pictures": 2, "base_pictures": 1, "steps": 4, "checkpoints": [2, 4], "ranks": [2], "seeds": [0],
         "lr_ours": [1.0, 4.0], "lr_lora": [1e-3, 1e-2], "thread_check": True, "quick_channels": 32,
         "pictures": {"ranks": [2, 4], "seeds": [0], "steps": 2, "checkpoints": [1, 2], "lr_ours": [1.0],
                      "lr_lora": [1e-3, 1e-2], "sides": ["ours", "lora"], "sample_steps": 1, "prompts": [1, 1, 1]}}


def base_cfg(cfg: dict, name: str) -> dict:
    """The settings a base's runs use: the picture-level base's own (cfg["pictures"]) over the rest."""
    return {**cfg, **cfg["pictures"]} if BASES[name].get("pictures") else cfg


def say(text: str) -> None:
    print(f"[bench-method] {text}", flush=True)


# =========================================================================== data


CENTRED = ("rings", "diamond", "bars", "cross", "spiral")  # classes placed by a random centre


def _pattern(kind: str, gen, side: int, torch):  # noqa: C901 - one branch per class
    """One [side, side] pattern of a class, random phase/position, zero mean, unit std."""
    r = lambda *shape: torch.rand(*shape, generator=gen)  # noqa: E731
    ax = torch.linspace(-1, 1, side)
    y, x = torch.meshgrid(ax, ax, indexing="ij")
    phase = r(1) * 2 * math.pi
    c = r(2) - 0.5 if kind in CENTRED else None
    if kind == "stripes_h":
        p = torch.sin(3 * math.pi * y + phase)
    elif kind == "stripes_d":
        p = torch.sin(2.5 * math.pi * (x + y) + phase)
    elif kind == "blobs":
        p = sum(torch.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2) / 0.08) for c in r(3, 2) * 2 - 1)
    elif kind == "checks":
        p = torch.sign(torch.sin(2 * math.pi * x + phase) * torch.sin(2 * math.pi * y + r(1) * 6.3))
    elif kind == "ramp":
        a = r(1) * 2 * math.pi
        p = torch.cos(a) * x + torch.sin(a) * y
    elif kind == "stripes_v":
        p = torch.sign(torch.sin(2 * math.pi * x + phase))
    elif kind == "rings":  # a style: no base class is drawn like it
        p = torch.cos(5 * math.pi * torch.sqrt((x - c[0]) ** 2 + (y - c[1]) ** 2) + phase)
    elif kind == "waves":
        p = torch.sin(3 * math.pi * x + 1.5 * torch.sin(2 * math.pi * y + phase))
    elif kind == "dots":
        p = torch.cos(3 * math.pi * x + phase) * torch.cos(3 * math.pi * y + r(1) * 6.3)
    elif kind == "diamond":
        p = torch.cos(4 * math.pi * ((x - c[0]).abs() + (y - c[1]).abs()) + phase)
    elif kind == "bars":
        a = r(1) * math.pi
        p = torch.exp(-((torch.cos(a) * x + torch.sin(a) * y - c[0]) ** 2) / 0.05)
    elif kind == "cross":
        p = torch.exp(-((x - c[0]) ** 2) / 0.03) + torch.exp(-((y - c[1]) ** 2) / 0.03)
    elif kind == "smooth":
        p = torch.nn.functional.interpolate(torch.randn(1, 1, 3, 3, generator=gen), size=(side, side),
                                            mode="bicubic", align_corners=True)[0, 0]
    elif kind == "spiral":  # a style: no base class is drawn like it
        theta = torch.atan2(y - c[1], x - c[0])
        p = torch.cos(3 * theta + 6 * math.pi * torch.sqrt((x - c[0]) ** 2 + (y - c[1]) ** 2) + phase)
    else:
        raise ValueError(kind)
    p = p - p.mean()
    return p / p.std().clamp_min(1e-6)


class Data:
    """Procedural latents in the model's own space (what it denoises: process_latent_in of a
    LATENT) and one caption embedding per class, all from the base's fixed seed."""

    def __init__(self, base: dict, cfg: dict, torch):
        self.torch, self.side = torch, cfg["latent"]
        self.kinds, self.style = base["kinds"], base["style"]
        g = torch.Generator().manual_seed(base["seed"])
        kinds = (*self.kinds, self.style)
        self.mix = {k: torch.randn(4, generator=g) for k in kinds}  # colour mix per class
        self.caption = {k: torch.randn(1, 77, 768, generator=g) for k in kinds}
        self.pool = {k: self.pictures(k, cfg["pictures_per_class"], f"pool-{k}") for k in self.kinds}
        self.train = self.pictures(self.style, cfg["train_pictures"], "style-train")
        self.heldout = self.pictures(self.style, cfg["heldout_pictures"], "style-heldout")
        self.base = {k: self.pictures(k, cfg["base_pictures"], f"base-{k}") for k in self.kinds}

    def pictures(self, kind: str, n: int, stream: str):
        torch = self.torch
        g = torch.Generator().manual_seed(int(hashlib.sha256(stream.encode()).hexdigest()[:12], 16))
        out = []
        for _ in range(n):
            p = _pattern(kind, g, self.side, torch)
            out.append(self.mix[kind][:, None, None] * p + 0.1 * torch.randn(4, self.side, self.side, generator=g))
        return torch.stack(out)


# =========================================================================== the base model


def build_base(host: Host, channels: int, like=None):
    """An SD1.5-shaped model (ComfyUI's SD15 config and BaseModel: eps prediction, its noise
    schedule, CLIP-L-sized context, its key map) with the test fixture's one-level UNet at
    ``channels`` wide, weights filled as the fixture's are or copied from the BaseModel ``like``;
    a ModelPatcher on the CPU that, as a loader's, can load itself again (with the weights its
    model has then: pretrained, once `pretrain` ran)."""
    import comfy.model_patcher
    import comfy.supported_models

    from harness.fixtures.tiny import SEED, UNET_CONFIG, fill

    torch = host.torch
    config = comfy.supported_models.SD15({**UNET_CONFIG, "model_channels": channels, "num_res_blocks": [1],
                                          "adm_in_channels": None, "use_temporal_attention": False})
    model = config.get_model({}, device="cpu")
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for key, value in model.diffusion_model.state_dict().items():
            value.copy_(fill(key, value.shape, g))
    if like is not None:
        model.diffusion_model.load_state_dict(like.diffusion_model.state_dict())
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=host.mm.get_torch_device(),
                                               offload_device=host.mm.unet_offload_device())
    return as_loader_made(patcher, lambda: reload_base(host, channels, model))


RELOADED: list = []  # the BaseModels ComfyUI loaded again (0.33's TrainLoraNode trains such a copy)


def reload_base(host: Host, channels: int, like):
    patcher = build_base(host, channels, like)
    RELOADED.append(patcher.model)
    return patcher


def track_reloads(patcher):
    """A patcher from ComfyUI's checkpoint loader (the picture base): from 0.33 on, TrainLoraNode
    trains a copy that the loader's cached_patcher_init loads again, so that copy, not ``patcher``,
    is the one to measure (RELOADED, as reload_base does for the latent bases). Without the hook
    (0.3.75) ``patcher`` is left as it is."""
    init = getattr(patcher, "cached_patcher_init", None)
    if not init:
        return patcher
    load, *rest = init  # (loader, args) or (loader, args, index of the patcher in what it returns)

    def reload(*args, **kwargs):
        out = load(*args, **kwargs)
        RELOADED.append((out[rest[1]] if len(rest) > 1 else out).model)
        return out

    patcher.cached_patcher_init = (reload, *rest)
    return patcher


def pretrain_key(base: dict, cfg: dict) -> str:
    keys = ("latent", "pretrain_steps", "pretrain_batch", "pretrain_lr", "pictures_per_class")
    code = "".join(inspect.getsource(f) for f in (_pattern, Data, build_base, pretrain))  # what makes the model
    text = json.dumps({**{k: cfg[k] for k in keys}, **base}, sort_keys=True) + code
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def pretrain(host: Host, model, data: Data, cfg: dict, path: Path) -> dict:
    """Trains the whole UNet on the base classes (eps MSE, uniform noise levels), or loads the
    cached result from ``path``."""
    torch = host.torch
    from safetensors.torch import load_file, save_file

    unet = model.model.diffusion_model
    if path.exists():
        unet.load_state_dict(load_file(str(path)))
        return {"cached": True, "seconds": 0.0, "file": str(path)}
    t0 = time.perf_counter()
    base, ms = model.model, model.model.model_sampling
    unet.train(False)
    params = list(unet.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg["pretrain_lr"])
    g = torch.Generator().manual_seed(0)
    pool = torch.cat([data.pool[k] for k in data.kinds])
    labels = [k for k in data.kinds for _ in range(len(data.pool[k]))]
    losses = []
    for step in range(cfg["pretrain_steps"]):
        idx = torch.randint(len(pool), (cfg["pretrain_batch"],), generator=g)
        x0 = pool[idx]
        ctx = torch.cat([data.caption[labels[i]] for i in idx.tolist()])
        sig = torch.tensor([float(ms.percent_to_sigma(float(p))) for p in
                            (1e-4 + (1 - 2e-4) * torch.rand(len(idx), generator=g)).tolist()])
        noise = torch.randn(x0.shape, generator=g)
        xt = ms.noise_scaling(sig, noise, x0, False)
        denoised = base.apply_model(xt, sig, c_crossattn=ctx)
        coeff = ms.calculate_denoised(sig, torch.ones_like(x0), torch.zeros_like(x0))
        loss = ((denoised - x0) / coeff).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if (step + 1) % 100 == 0:
            say(f"  pretrain step {step + 1}/{cfg['pretrain_steps']}: loss {statistics.mean(losses[-100:]):.4f}")
    for p in params:
        p.requires_grad_(False)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    save_file({k: v.detach().contiguous() for k, v in unet.state_dict().items()}, str(tmp))
    os.replace(tmp, path)
    return {"cached": False, "seconds": time.perf_counter() - t0, "file": str(path),
            "loss_first": statistics.mean(losses[:50]), "loss_last": statistics.mean(losses[-50:])}


# =========================================================================== measurement


class Probe:
    """Fixed noise at fixed levels for each measured set; `measure` gives eps and x0 errors
    of the model as it is now (adapters attached or not)."""

    def __init__(self, model, data: Data, torch):
        self.torch, self.base = torch, model.model
        ms = self.base.model_sampling
        g = torch.Generator().manual_seed(1234)
        sets = {"train": (data.train, data.caption[data.style]),
                "heldout": (data.heldout, data.caption[data.style]),
                "base": (torch.cat([data.base[k] for k in data.kinds]),
                         torch.cat([data.caption[k] for k in data.kinds for _ in range(len(data.base[k]))]))}
        self.sets, self.levels = {}, {}
        self.masks = None  # (adapters, min_rank, rank_mask): T-LoRA's mask in the measurement too
        for name, (x0, ctx) in sets.items():
            n = len(x0)
            x0 = x0.repeat(len(LEVELS), 1, 1, 1)
            ctx = ctx.expand(n, -1, -1) if ctx.shape[0] == 1 else ctx
            ctx = ctx.repeat(len(LEVELS), 1, 1)
            sigma = torch.tensor([float(ms.percent_to_sigma(p)) for p in LEVELS]).repeat_interleave(n)
            noise = torch.randn(x0.shape, generator=g)
            coeff = ms.calculate_denoised(sigma, torch.ones_like(x0), torch.zeros_like(x0))
            self.sets[name] = (ms.noise_scaling(sigma, noise, x0, False), sigma, ctx, x0, coeff)
            self.levels[name] = 1 - torch.tensor(LEVELS).repeat_interleave(n)  # noise level, 1 the noisiest
        self.reference = {name: self.predict(name) for name in self.sets}  # the base model's own
        self.start = self.measure()  # step 0 of every curve

    def predict(self, name: str, base=None):
        torch, base = self.torch, base or self.base
        xt, sigma, ctx, x0, coeff = self.sets[name]
        out = []
        with torch.no_grad():
            for i in range(0, len(xt), 40):
                self.mask(self.levels[name][i:i + 40])
                out.append(base.apply_model(xt[i:i + 40], sigma[i:i + 40], c_crossattn=ctx[i:i + 40]))
        self.mask(None)
        return torch.cat(out).float()

    def mask(self, levels) -> None:
        """With ``masks`` set: each adapter uses, per sample, the directions T-LoRA's schedule gives
        its noise level (what a sampler masking by noise level would give); None clears."""
        if self.masks is None:
            return
        adapters, min_rank, rank_mask = self.masks
        for a in adapters:
            a.rank_mask = None if levels is None else rank_mask(levels, a.trilora_s.shape[0], min_rank)

    def measure(self, base=None) -> dict:
        """``base``: the BaseModel in training where it is not the probe's own (a reloaded copy)."""
        out = {}
        for name in ("train", "heldout", "base"):
            _, _, _, x0, coeff = self.sets[name]
            denoised = self.predict(name, base)
            if name == "base":  # change of the prediction, not error against the picture
                diff = denoised - self.reference[name]
                out["drift_x0"], out["drift_eps"] = float(diff.square().mean()), float((diff / coeff).square().mean())
            else:
                err = denoised - x0
                out[f"{name}_x0"], out[f"{name}_eps"] = float(err.square().mean()), float((err / coeff).square().mean())
        return out


# =========================================================================== one training run per side


def node_defaults(node) -> dict:
    """The node's inputs at their schema defaults (keyword args: newer ComfyUI inserts inputs mid-list)."""
    return {inp.id: [inp.default] for inp in node.define_schema().inputs if getattr(inp, "default", None) is not None}


def parse_overrides(text: str, node) -> dict:
    """'name=value,name=value' -> {name: [typed value]} for the node's own inputs."""
    if not text:
        return {}
    defaults = node_defaults(node)
    out = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        name = name.strip()
        if name not in defaults:
            raise SystemExit(f"--ours: {name!r} is not an input of TrainTriLoRA with a default")
        kind = type(defaults[name][0])
        out[name] = [value.strip().lower() in ("1", "true", "yes") if kind is bool else kind(value.strip())]
    return out


@contextlib.contextmanager
def only_layers(weight_keys: set[str]):
    """TrainLoraNode restricted to ``weight_keys``: ModelPatcher.add_weight_wrapper, which it
    calls for every weight, bias and norm, keeps only those keys. The other adapters it creates
    never run, get no gradient, and its optimizer (AdamW) leaves them alone."""
    import comfy.model_patcher

    cls = comfy.model_patcher.ModelPatcher
    original, added = cls.add_weight_wrapper, set()

    def add_weight_wrapper(self, name, function):
        if name in weight_keys:
            added.add(name)
            return original(self, name, function)
        return None

    cls.add_weight_wrapper = add_weight_wrapper
    try:
        yield added
    finally:
        cls.add_weight_wrapper = original
    if added != weight_keys:
        raise RuntimeError(f"TrainLoraNode adapted {len(added)} of the {len(weight_keys)} layers asked for")


def same_layers(host: Host, model, overrides: dict) -> set[str]:
    """The weight keys (as TrainLoraNode names them) of the layers TrainTriLoRA adapts."""
    target = overrides.get("target_layers", node_defaults(host.ours)["target_layers"])[0]
    return {f"{t.name}.weight" for t in host.train_mod.find_targets(model, target)}


def attached_adapters(base) -> list:
    """TrainTriLoRA's adapters on ``base`` while it trains (the bypass forward hooks' adapters)."""
    hooks = [h for m in base.diffusion_model.modules() for h in m._forward_hooks.values()]
    return [h.args[0] for h in hooks if getattr(h, "args", None) and hasattr(h.args[0], "trilora_s")]


def training_set(model, data, probe) -> tuple[list, list]:
    """(latents, positive) as the trainers take them: the style's pictures (LATENT dicts) and
    their caption(s) (one CONDITIONING per picture, or one for all)."""
    if data is None:  # the picture-level base: its PictureBase holds them
        return probe.latents, probe.positive
    latents = [{"samples": model.model.process_latent_out(data.train[i:i + 1].clone())}
               for i in range(len(data.train))]
    return latents, [[[data.caption[data.style].clone(), {}]]]


def train_run(host: Host, run: dict, model, data: Data | None, probe, cfg: dict, overrides: dict) -> dict:
    """Trains one side (run: side, lr, rank, seed) from the pretrained base, measuring at the
    checkpoints with ``probe`` (a Probe, or for the picture-level base, whose ``data`` is None, its
    PictureBase); returns the curve."""
    torch, side = host.torch, run["side"]
    node = host.ours if side == "ours" else host.theirs
    kwargs = node_defaults(node)
    latents, positive = training_set(model, data, probe)
    # Gradient checkpointing off on every side: it only saves memory (the figures agree to ~1e-7
    # relative with it on, less than the thread check's change) and costs ~27 % more CPU.
    kwargs.update(model=[model], latents=latents, positive=positive, gradient_checkpointing=[False],
                  steps=[cfg["steps"]], rank=[run["rank"]], seed=[run["seed"]], training_dtype=["fp32"])
    if side == "ours":
        kwargs.update(overrides)
    else:
        kwargs.update(lora_dtype=["fp32"], existing_lora=["[None]"])
    if run["lr"] is not None:
        kwargs["learning_rate"] = [run["lr"]]
    accepted = inspect.signature(node.execute).parameters
    kwargs = {k: v for k, v in kwargs.items() if k in accepted or side == "ours"}
    curve = {0: dict(probe.start)}
    marks = set(cfg["checkpoints"])
    name = f"{side} lr {run['lr'] or 'default'} rank {run['rank']} seed {run['seed']}"

    def hook(value, total, preview=None, node_id=None):
        if value in marks and value not in curve:
            if cfg.get("probe_min_rank") and side == "ours" and data is not None:
                probe.masks = (attached_adapters(RELOADED[-1] if RELOADED else probe.base), cfg["probe_min_rank"],
                               host.core.rank_mask)
            try:
                curve[value] = probe.measure(RELOADED[-1] if RELOADED else probe.base)
            finally:
                probe.masks = None

    host.settle()
    RELOADED.clear()
    torch.manual_seed(run["seed"])  # TrainLoraNode draws its init, order and noise levels from the global RNG
    host.utils.set_progress_bar_global_hook(hook)
    restrict = only_layers(same_layers(host, model, overrides)) if side == "lora" else contextlib.nullcontext()
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        with torch.inference_mode(), restrict:
            node.execute(**kwargs)
    finally:
        host.utils.set_progress_bar_global_hook(None)
        host.settle()
    missing = marks - set(curve)
    if missing:
        raise RuntimeError(f"{name}: no measurement at steps {sorted(missing)} (progress hook not called)")
    last = curve[max(curve)]
    figures = (f"frame {last['heldout_frame']:+.3f} (style {last['heldout_pic']:.3f}), drift {last['drift_pic']:.5f}"
               if data is None else f"held-out eps {last['heldout_eps']:.4f} x0 {last['heldout_x0']:.4f}, drift eps "
               f"{last['drift_eps']:.5f}")
    say(f"  {run['base']} {name}: {figures} [{time.perf_counter() - t0:.0f} s, CPU {time.process_time() - c0:.0f} s]")
    # CPU time: with one thread, about the wall time this run takes on a machine it has to itself.
    return {**run, "curve": {str(k): curve[k] for k in sorted(curve)}, "seconds": time.perf_counter() - t0,
            "cpu_seconds": time.process_time() - c0}


# =========================================================================== the deciding figures


# =========================================================================== the report


def fmt(value, digits=3) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}" if abs(value) >= 10 ** -digits or value == 0 else f"{value:.1e}"


def spread(values, digits=2) -> str:
    """median [min-max] of the values that exist."""
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    return f"{fmt(statistics.median(values), digits)} [{fmt(min(values), digits)}-{fmt(max(values), digits)}]"


def yes(flags) -> str:
    flags = list(flags)
    return f"{sum(bool(f) for f in flags)}/{len(flags)}"


def report_frontier(results: dict) -> list[str]:
    lines = ["## The frontier claim: TrainTriLoRA against LoRA on the same layers", "",
             "Drift ratio (ours / lora, each side's least drift over its learning rates) at held-out levels "
             f"{', '.join(str(f) for f in FIT_FRACTIONS)} of the way from the base model's error to the best "
             "level both sides reach: median [min-max] over seeds. Gap: ours' least gap growth no larger than "
             "lora's at every level. Holds: both, at every level (seeds where it holds / seeds).", "",
             "| base | error | rank | " + " | ".join(f"drift ratio at {f}" for f in FIT_FRACTIONS) +
             " | gap no larger | holds |", "|---|---|---|" + "---|" * (len(FIT_FRACTIONS) + 2)]
    for base in latent_bases(results):
        for space in SPACES:
            for rank in results["config"]["ranks"]:
                rows = [p["decide"]["frontier"][space] for p in results["pairs"] if (p["base"], p["rank"]) == (base, rank)]
                if not rows:
                    continue
                ratios = [spread([r["rows"][i]["drift_ratio"] if r["rows"] else None for r in rows])
                          for i in range(len(FIT_FRACTIONS))]
                lines.append(f"| {base} | {space} | {rank} | {' | '.join(ratios)} | {yes(r['gap_holds'] for r in rows)} "
                             f"| {yes(r['holds'] for r in rows)} |")
    return [*lines, ""]


def report_defaults(results: dict) -> list[str]:
    lines = ["## The defaults' goals", "",
             "Per run of TrainTriLoRA at the default learning rate. x0 <= base: held-out x0 error at no "
             "checkpoint above the base model's; x0 <= TrainLoraNode: at the last step; drift vs lora: drift "
             "at matched held-out eps fit / the least of LoRA on the same layers there (<= 0.7); issue 19: "
             "against TrainLoraNode at its defaults, drift at its held-out fit <= 0.7x and gap growth no larger.",
             "", "| base | rank | seed | held-out eps: ours / lora best / TrainLoraNode | held-out x0: ours max / base "
             "/ ours last / TrainLoraNode | drift vs lora | drift vs TrainLoraNode | gap ours / TrainLoraNode | "
             "x0 <= base, x0 <= TrainLoraNode, drift vs lora, issue 19 |", "|---|---|---|---|---|---|---|---|---|"]
    for p in latent_pairs(results):
        g = p["decide"]["defaults"]
        marks = " ".join("yes" if g[k] else "NO" for k in ("x0_never_above_base", "x0_no_worse_than_theirs",
                                                             "drift_vs_lora", "issue19"))
        lines.append(f"| {p['base']} | {p['rank']} | {p['seed']} | {fmt(g['heldout_eps_last'])} / "
                     f"{fmt(g['heldout_eps_lora_best'])} / {fmt(g['heldout_eps_theirs'])} | {fmt(g['heldout_x0_max'])} / "
                     f"{fmt(g['heldout_x0_base'])} / {fmt(g['heldout_x0_last'])} / {fmt(g['heldout_x0_theirs'])} | "
                     f"{fmt(g['drift_ratio_vs_lora'], 2)} | {fmt(g['drift_ratio_vs_theirs'], 2)} | "
                     f"{fmt(g['gap_ours'], 4)} / {fmt(g['gap_theirs'], 4)} | {marks} |")
    return [*lines, "", *goals_not_met(latent_pairs(results)), ""]


def goals_not_met(pairs: list[dict]) -> list[str]:
    """Each goal of the defaults: in how many runs it holds, and where not, the figure that fails it."""
    def why(g: dict, goal: str) -> str:
        if goal == "x0_never_above_base":
            return f"held-out x0 up to {fmt(g['heldout_x0_max'])} against the base's {fmt(g['heldout_x0_base'])}"
        if goal == "x0_no_worse_than_theirs":
            return f"held-out x0 {fmt(g['heldout_x0_last'])} against TrainLoraNode's {fmt(g['heldout_x0_theirs'])}"
        if goal == "drift_vs_lora":
            return f"drift {fmt(g['drift_ratio_vs_lora'], 2)}x LoRA's at matched held-out eps fit"
        if g["drift_ratio_vs_theirs"] is None:
            return f"TrainLoraNode's held-out fit {fmt(g['heldout_eps_theirs'])} not reached ({fmt(g['heldout_eps_last'])})"
        return (f"drift {fmt(g['drift_ratio_vs_theirs'], 2)}x TrainLoraNode's at its fit, gap growth "
                f"{fmt(g['gap_ours'], 4)} against its {fmt(g['gap_theirs'], 4)}")

    names = {"x0_never_above_base": "held-out x0 never above the base model's",
             "x0_no_worse_than_theirs": "held-out x0 at the last step no worse than TrainLoraNode's",
             "drift_vs_lora": f"drift at matched fit <= {GOAL_DRIFT_RATIO}x LoRA's on the same layers",
             "issue19": f"issue 19: drift <= {GOAL_DRIFT_RATIO}x TrainLoraNode's at its fit, gap no larger"}
    lines = ["Goals of the defaults, and why each is not met where it is not:", ""]
    for goal, name in names.items():
        failed = [p for p in pairs if not p["decide"]["defaults"][goal]]
        lines.append(f"- {name}: met in {len(pairs) - len(failed)}/{len(pairs)} runs" +
                     ("" if not failed else "; not met: " + "; ".join(
                         f"{p['base']} rank {p['rank']} seed {p['seed']}: {why(p['decide']['defaults'], goal)}"
                         for p in failed)))
    return lines


def report_curves(results: dict) -> list[str]:
    lines = ["## Each side and learning rate at the last step (mean over seeds)", "",
             "| base | rank | side | lr | held-out eps | gap eps | drift eps | held-out x0 | gap x0 | drift x0 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for base in latent_bases(results):
        for rank in results["config"]["ranks"]:
            pairs = [p for p in results["pairs"] if (p["base"], p["rank"]) == (base, rank)]
            if not pairs:
                continue
            for i, run in enumerate(pairs[0]["runs"]):
                pts = [p["runs"][i]["curve"][str(results["config"]["steps"])] for p in pairs]
                m = {k: statistics.mean(q[k] for q in pts) for k in pts[0]}
                lines.append(f"| {base} | {rank} | {run['side']} | {run['lr'] or 'default'} | {fmt(m['heldout_eps'])} | "
                             f"{fmt(m['gap_eps'], 4)} | {fmt(m['drift_eps'], 4)} | {fmt(m['heldout_x0'])} | "
                             f"{fmt(m['gap_x0'], 4)} | {fmt(m['drift_x0'], 4)} |")
    return [*lines, ""]


def latent_bases(results: dict) -> list[str]:
    return [b for b in results["config"]["bases"] if not BASES[b].get("pictures")]


def latent_pairs(results: dict) -> list[dict]:
    return [p for p in results["pairs"] if not p.get("pictures")]


def report_pictures(results: dict) -> list[str]:
    """The picture-level base: per rank and seed, the frontier in the picture space, the defaults'
    frame and drift against LoRA's; and each side and learning rate at the last step."""
    pairs = [p for p in results["pairs"] if p.get("pictures")]
    if not pairs:
        return []
    c = base_cfg(results["config"], pairs[0]["base"])
    lines = ["## Pictures: the drawing model (the demo's sample style)", "",
             f"{c['steps']} steps, measured at {', '.join(map(str, c['checkpoints']))} on pictures sampled as the generate "
             f"workflow does ({c['sample_steps']} Euler steps, cfg 7): style = |frame contrast of held-out style prompts "
             "- the sample pictures'| (0: the style's frame), drift = mean squared change of the base prompts' "
             "pictures (pixels in [0, 1]), content = RGB distance of the large shape to the prompt's colour. Frontier "
             f"as for latents (LoRA on the same layers at {', '.join(fmt(x, 4) for x in c['lr_lora'])}; TrainTriLoRA at "
             f"{', '.join(fmt(m, 2) for m in c['lr_ours'])}x its learning rate). The defaults' columns: the "
             "default learning rate's run alone, at the best style it reaches (or LoRA's best, if that is worse), "
             "which can be earlier than the last step; the drift ratio columns use every TrainTriLoRA learning rate "
             "at the levels both sides reach.", "",
             "| base | rank | seed | " + " | ".join(f"drift ratio at {f}" for f in FIT_FRACTIONS) +
             " | gap no larger | defaults: frame at the last step | defaults: best style / LoRA's best | "
             "defaults: drift vs LoRA at its best style | content: base / defaults last |",
             "|---|---|---|" + "---|" * (len(FIT_FRACTIONS) + 5)]
    for p in pairs:
        fr, g = p["decide"]["frontier"][PICTURE_SPACE], p["decide"]["defaults"]
        ratios = [fmt(r["drift_ratio"], 2) for r in fr["rows"]] or ["n/a"] * len(FIT_FRACTIONS)
        lines.append(f"| {p['base']} | {p['rank']} | {p['seed']} | {' | '.join(ratios)} | "
                     f"{'yes' if fr['gap_holds'] else 'NO'} | {g['frame_last']:+.3f} ({'visible' if g['frame_visible'] else 'NOT visible'}) | "
                     f"{fmt(g['fit_best'])} / {fmt(g['fit_lora_best'])} | {fmt(g['drift_ratio_vs_lora'], 2)} | "
                     f"{fmt(g['content_base'])} / {fmt(g['content_last'])} |")
    lines += ["", "| rank | side | lr | " + " | ".join(f"style / drift / frame at {k}" for k in c["checkpoints"]) + " |",
              "|---|---|---|" + "---|" * len(c["checkpoints"])]
    for rank in c["ranks"]:
        group = [p for p in pairs if p["rank"] == rank]  # none yet in a partial report
        for i, run in enumerate(group[0]["runs"] if group else []):
            cells = []
            for k in c["checkpoints"]:
                pts = [p["runs"][i]["curve"][str(k)] for p in group]
                m = {key: statistics.mean(q[key] for q in pts) for key in ("heldout_pic", "drift_pic", "heldout_frame")}
                cells.append(f"{fmt(m['heldout_pic'])} / {fmt(m['drift_pic'], 4)} / {m['heldout_frame']:+.3f}")
            lines.append(f"| {rank} | {run['side']} | {run['lr']} | {' | '.join(cells)} |")
    return [*lines, "(mean over seeds)", ""]


def report(results: dict) -> str:
    m = results["machine"]
    lines = [f"# bench-method ({results['label']}, {results['time']})", "",
             f"Machine: {m.get('cpu')}, {m.get('cores')} cores, torch {m.get('torch')}, {results['threads']} torch "
             f"thread(s) in each of {results['workers']} worker process(es). Command: `{results['command']}`. "
             f"Wall time {results['seconds']:.0f} s; CPU time {fmt(results['cpu_seconds'], 0)} s (all processes), of "
             f"which the runs trained here {results['train_cpu_seconds']:.0f} s; load average "
             f"{m['loadavg_start'][0]:.1f} at the start, {results['loadavg_end'][0]:.1f} at the end. TrainTriLoRA "
             f"overrides: {results['ours_overrides'] or 'none (defaults)'}; its learning rates "
             f"{', '.join(fmt(x, 6) for x in results['lr_ours'])} (default {fmt(results['default_lr'], 6)}); "
             f"LoRA on the same layers: {', '.join(fmt(x, 4) for x in results['config']['lr_lora'])}.", "",
             "| base | channels | classes, style | held-out eps | held-out x0 | drift pictures |",
             "|---|---|---|---|---|---|"]
    for name, b in results["base_models"].items():
        if b.get("pictures"):
            lines.append(f"| {name} | {b['channels']} | {', '.join(b['kinds'])}; style {b['style']} | pictures: style "
                         f"{fmt(b['start']['heldout_pic'])} (frame {b['start']['heldout_frame']:+.3f}) | content "
                         f"{fmt(b['start']['content_pic'])} | {b['drift_pictures']} prompts |")
            continue
        lines.append(f"| {name} | {b['channels']} | {', '.join(b['kinds'])}; style {b['style']} | "
                     f"{fmt(b['start']['heldout_eps'])} | {fmt(b['start']['heldout_x0'])} | {b['drift_pictures']} |")
    latent = bool(latent_pairs(results))  # none with --bases drawing: no empty latent tables
    if results["sides"] == list(SIDES):
        lines += ["", *(report_frontier(results) + report_defaults(results) if latent else []),
                  *report_pictures(results)]
    if latent:
        lines += ["", *report_curves(results)]
    tc = results.get("thread_check")
    if tc:
        lines += ["## Thread check", "",
                  f"{tc['base']} rank {tc['rank']} seed {tc['seed']}, TrainTriLoRA at the default learning rate and "
                  f"LoRA on the same layers at {tc['lora_lr']}, again with 2 torch threads: largest relative change of "
                  f"any measured figure {tc['max_relative_change']:.2e}; verdicts "
                  f"{'unchanged' if tc['verdicts_same'] else 'CHANGED: ' + json.dumps(tc['verdicts'])}. These two runs "
                  f"of the bench's {sum(len(p['runs']) for p in results['pairs'])} are the subset rerun (every other "
                  f"ran with 1 thread); 2-thread CPU time {tc['cpu_seconds']:.0f} s.", ""]
    return "\n".join(lines) + "\n"


# =========================================================================== main


def run_key(run: dict, cfg: dict, target: str) -> str:
    where = f"-{target}" if run["side"] == "lora" else ""
    return (f"{run['side']}{where}-lr{run['lr']}-r{run['rank']}-s{run['seed']}-t{run['threads']}-n{cfg['steps']}"
            f"-c{','.join(map(str, cfg['checkpoints']))}-nockpt-comfy{'.'.join(map(str, COMFY_VERSION))}")  # 0.33 trains a copy


class RunCache:
    """LoRA's and TrainLoraNode's runs of one base model (they do not depend on TrainTriLoRA's
    settings), so an experiment with --ours costs only its own runs. Only the main process reads
    and writes it; merged on write."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def get(self, key: str):
        if not self.enabled or not self.path.exists():
            return None
        return json.loads(self.path.read_text()).get(key)

    def put(self, key: str, run: dict) -> None:
        cache = {**(json.loads(self.path.read_text()) if self.path.exists() else {}), key: run}
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, self.path)


# ---- the workers: each process holds its own ComfyUI, base models and probes. A run's figures
# depend only on the run (seeded, the base model from its file, the probe's fixed noise), never on
# the process or what it ran before, so any number of workers gives the same numbers.

WORKER: dict = {}


def worker_init(cfg: dict, ours_text: str, out: str, threads: int) -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)
    host = Host("cpu", threads)
    WORKER.update(host=host, cfg=cfg, overrides=parse_overrides(ours_text, host.ours), out=Path(out), bases={},
                  threads=threads)


def worker_base(name: str):
    """(model, data, probe, pretrain info) of base ``name`` in this process, pretrained (or loaded
    from the cache file) on first use."""
    if name not in WORKER["bases"] and BASES[name].get("pictures"):
        from harness import COMFY
        from harness.bench_pictures import PictureBase
        from harness.fixtures import drawing

        cfg = base_cfg(WORKER["cfg"], name)
        path = COMFY / "models" / "checkpoints" / drawing.FILE_NAME
        if not drawing.is_current(path):
            raise SystemExit(f"{path} is missing or stale: run `make setup`")
        pictures = PictureBase(WORKER["host"], path, cfg["sample_steps"], *cfg["prompts"])
        track_reloads(pictures.model)
        WORKER["bases"][name] = (pictures.model, None, pictures, {"file": str(path), "spec": drawing.spec()})
    if name not in WORKER["bases"]:
        host, cfg = WORKER["host"], WORKER["cfg"]
        spec = base_spec(name, cfg)
        model, data = build_base(host, spec["channels"]), Data(spec, cfg, host.torch)
        info = pretrain(host, model, data, cfg, WORKER["out"] / f"base-{pretrain_key(spec, cfg)}.safetensors")
        WORKER["bases"][name] = (model, data, Probe(model, data, host.torch), info)
    return WORKER["bases"][name]


def job_setup() -> dict:
    """TrainTriLoRA's default learning rate and layers (with --ours applied)."""
    host, overrides = WORKER["host"], WORKER["overrides"]
    defaults = node_defaults(host.ours)
    return {"default_lr": overrides.get("learning_rate", defaults["learning_rate"])[0],
            "target": overrides.get("target_layers", defaults["target_layers"])[0]}


def job_prepare(name: str) -> dict:
    model, data, probe, info = worker_base(name)
    say(f"base model {name}: {info}; {json.dumps({k: round(v, 4) for k, v in probe.start.items()})}")
    drift = len(probe.prompts["base"]) if data is None else len(probe.sets["base"][0]) // len(LEVELS)
    return {**base_spec(name, WORKER["cfg"]), "pretrain": info, "start": probe.start, "drift_pictures": drift}


def job_train(runs: list[dict]) -> list[dict]:
    """Trains ``runs`` one after another (each: base, side, lr, rank, seed, threads)."""
    host = WORKER["host"]
    results = []
    for run in runs:
        model, data, probe, _ = worker_base(run["base"])
        host.torch.set_num_threads(run["threads"])
        try:
            cfg = base_cfg(WORKER["cfg"], run["base"])
            results.append(train_run(host, run, model, data, probe, cfg, WORKER["overrides"]))
        finally:
            host.torch.set_num_threads(WORKER["threads"])
    return results


class Workers:
    """``n`` worker processes of one torch thread each (spawned: each imports its own ComfyUI), or,
    for n = 1, this process."""

    def __init__(self, n: int, cfg: dict, opts):
        args = (cfg, opts.ours, opts.out, opts.threads)
        if n > 1:
            import concurrent.futures
            import multiprocessing

            self.pool = concurrent.futures.ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"),
                                                               initializer=worker_init, initargs=args)
        else:
            self.pool = None
            worker_init(*args)

    def imap(self, fn, items: list):
        """fn over items, all queued at once; yields the results in the items' order."""
        if self.pool is None:
            yield from (fn(*i) for i in items)
            return
        for future in [self.pool.submit(fn, *i) for i in items]:
            yield future.result()

    def map(self, fn, items: list) -> list:
        return list(self.imap(fn, items))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def base_spec(name: str, cfg: dict) -> dict:
    if BASES[name].get("pictures"):
        return dict(BASES[name])
    return {**BASES[name], "channels": cfg.get("quick_channels", BASES[name]["channels"])}


def base_key(name: str, cfg: dict) -> str:
    """What a base's cached runs depend on: the pretrained latent model's key, or for the picture
    base the drawing model's build spec, the measuring code and the picture settings."""
    if not BASES[name].get("pictures"):
        return pretrain_key(base_spec(name, cfg), cfg)
    from harness import bench_pictures
    from harness.fixtures import drawing

    text = drawing.spec() + inspect.getsource(bench_pictures) + json.dumps(cfg["pictures"], sort_keys=True)
    return "pictures-" + hashlib.sha256(text.encode()).hexdigest()[:12]


def relative_change(a: list[dict], b: list[dict]) -> float:
    """The largest |x - y| / |x| over every measured figure of matching runs' curves."""
    worst = 0.0
    for ra, rb in zip(a, b, strict=True):
        for step, pa in ra["curve"].items():
            for k, x in pa.items():
                y = rb["curve"][step][k]
                if x != y:
                    worst = max(worst, abs(x - y) / max(abs(x), 1e-12))
    return worst


def verdicts(d: dict) -> dict:
    return {**{f"frontier_{s}": d["frontier"][s]["holds"] for s in SPACES}, "defaults": d["defaults"]["all"]}


def thread_check(workers: Workers, pair: dict, cfg: dict, default_lr: float) -> dict:
    """The default run and one LoRA run of ``pair`` again with 2 torch threads, in one worker while
    the others wait (2 threads beside busy workers would oversubscribe the cores)."""
    lora_lr = cfg["lr_lora"][len(cfg["lr_lora"]) // 2]
    picks = [i for i, r in enumerate(pair["runs"]) if (r["side"], r["lr"]) in (("ours", default_lr), ("lora", lora_lr))]
    again = workers.map(job_train, [([{**pair["runs"][i], "threads": 2} for i in picks],)])[0]
    runs = [dict(r) for r in pair["runs"]]
    for i, run in zip(picks, again, strict=True):
        runs[i] = run
    v1, v2 = verdicts(pair["decide"]), verdicts(decide(runs, default_lr))
    return {"base": pair["base"], "rank": pair["rank"], "seed": pair["seed"], "lora_lr": lora_lr,
            "max_relative_change": relative_change([pair["runs"][i] for i in picks], again),
            "verdicts_same": v1 == v2, "verdicts": {"1 thread": v1, "2 threads": v2},
            "cpu_seconds": sum(r["cpu_seconds"] for r in again), "seconds": sum(r["seconds"] for r in again)}


def options(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, a few steps (seconds)")
    parser.add_argument("--out", default=str(REPO / "bench_output" / "method"), help="folder for results and the cache")
    parser.add_argument("--bases", nargs="*", choices=sorted(BASES), help="override the base models (drawing: the "
                        "picture-level one, with its own ranks, seeds and learning rates: FULL['pictures'])")
    parser.add_argument("--ranks", type=int, nargs="*", help="override the ranks")
    parser.add_argument("--seeds", type=int, nargs="*", help="override the seeds")
    parser.add_argument("--steps", type=int, help="override the steps (checkpoints above it are dropped)")
    parser.add_argument("--lr-ours", type=float, nargs="*", help="TrainTriLoRA's learning rates, as multiples of its own")
    parser.add_argument("--lr-lora", type=float, nargs="*", help="LoRA's learning rates (same layers)")
    parser.add_argument("--ours", default="", help="TrainTriLoRA inputs to override, e.g. loss_weighting=min_snr")
    parser.add_argument("--label", default="", help="a name for this run's result files")
    parser.add_argument("--fresh", action="store_true", help="re-run LoRA and TrainLoraNode even where cached")
    parser.add_argument("--no-thread-check", action="store_true", help="skip the 2-thread rerun")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1: the figures "
                                                                 "are exact)")
    parser.add_argument("--sides", nargs="*", choices=SIDES, default=list(SIDES),
                        help="train only these sides (--sides ours: a mechanism's runs for "
                             "scripts/bench_method_compare.py; no frontier or goals without lora and theirs)")
    parser.add_argument("--probe-timestep-min-rank", type=int, default=0,
                        help="measure TrainTriLoRA with T-LoRA's noise-level mask at sampling too (with --ours "
                             "timestep_min_rank=N: the mask Load TriLoRA applies by the sampling step)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2, one per core of the "
                                                                "machine it was sized for; 1: in this process)")
    opts = parser.parse_args(argv)
    cfg = dict(QUICK if opts.quick else FULL)
    cfg["pictures"] = dict(cfg["pictures"])
    for name in ("bases", "ranks", "seeds", "lr_ours", "lr_lora"):
        if getattr(opts, name):
            cfg[name] = getattr(opts, name)
            if name != "bases":
                cfg["pictures"][name] = getattr(opts, name)
    for c in (cfg, cfg["pictures"]):
        c["steps"] = opts.steps or c["steps"]
        c["checkpoints"] = sorted({k for k in c["checkpoints"] if k < c["steps"]} | {c["steps"]})
    cfg["thread_check"] = cfg["thread_check"] and not opts.no_thread_check
    cfg["probe_min_rank"] = opts.probe_timestep_min_rank
    # the whole bench (its report is latest.md): nothing narrowed, TrainTriLoRA at its defaults
    cfg["whole"] = not opts.quick and not opts.ours and opts.sides == list(SIDES) and not opts.steps and not any(
        getattr(opts, n) for n in ("bases", "ranks", "seeds", "lr_ours", "lr_lora"))
    return opts, cfg


def plan(cfg: dict, default_lr: float, threads: int, only=SIDES) -> list[dict]:
    """Every run of the bench, seed by seed (a run cut short has every base and rank for the seeds
    it finished): per seed, base and rank (each base with its own, base_cfg), ours at each learning
    rate, lora at each, then TrainLoraNode at its defaults (the sides in ``only`` and the base's)."""
    runs = []
    for s in sorted({s for b in cfg["bases"] for s in base_cfg(cfg, b)["seeds"]}):
        for b in cfg["bases"]:
            c = base_cfg(cfg, b)
            sides = [("ours", lr) for lr in lr_ours(c, default_lr)] + [("lora", lr) for lr in c["lr_lora"]] + \
                [("theirs", None)]
            sides = [(side, lr) for side, lr in sides if side in only and side in c.get("sides", SIDES)]
            runs += [{"base": b, "side": side, "lr": lr, "rank": r, "seed": s, "threads": threads}
                     for r in c["ranks"] for side, lr in sides if s in c["seeds"]]
    return runs


def lr_ours(cfg: dict, default_lr: float) -> list[float]:
    """TrainTriLoRA's learning rates: the default times cfg["lr_ours"], and the default itself."""
    return sorted({default_lr * m for m in cfg["lr_ours"]} | {default_lr})


def pair_keys(runs: list[dict]) -> list[tuple]:
    """The (base, rank, seed) pairs of ``runs`` in their order, each once."""
    return list(dict.fromkeys((r["base"], r["rank"], r["seed"]) for r in runs))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    opts, cfg = options(argv)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start, c_start = time.perf_counter(), cpu_time()
    workers = Workers(opts.workers, cfg, opts)
    try:
        setup = workers.map(job_setup, [()])[0]
        default_lr, target = setup["default_lr"], setup["target"]
        state = {"pairs": [], "base_models": {}, "thread_check": None, "lr_ours": lr_ours(cfg, default_lr),
                 "default_lr": default_lr,
                 "workers": opts.workers, "machine": machine_info()}  # its load average: at the start
        say(f"pretraining (or cache) in {out}: {', '.join(cfg['bases'])}")
        state["base_models"] = dict(zip(cfg["bases"], workers.map(job_prepare, [(b,) for b in cfg["bases"]]),
                                        strict=True))
        caches = {b: RunCache(out / f"runs-{base_key(b, cfg)}.json", enabled=not opts.fresh and not opts.quick)
                  for b in cfg["bases"]}
        runs = plan(cfg, default_lr, opts.threads, opts.sides)
        keys = [run_key(r, base_cfg(cfg, r["base"]), target) if r["side"] != "ours" else None for r in runs]
        found = [caches[r["base"]].get(k) if k else None for r, k in zip(runs, keys, strict=True)]
        todo = {i for i, f in enumerate(found) if f is None}
        say(f"{len(runs)} runs, {len(runs) - len(todo)} from the cache, {len(todo)} to train in {opts.workers} "
            f"worker(s)")
        trained = workers.imap(job_train, [([runs[i]],) for i in sorted(todo)])
        for key in pair_keys(runs):  # the pairs in order, each once its runs are in
            idx = [i for i, r in enumerate(runs) if (r["base"], r["rank"], r["seed"]) == key]
            for i in idx:
                if found[i] is None:
                    found[i] = next(trained)[0]
                    if keys[i]:
                        caches[runs[i]["base"]].put(keys[i], found[i])
            state["pairs"].append(make_pair([runs[i] for i in idx], [found[i] for i in idx], [i not in todo for i in idx],
                                            default_lr if opts.sides == list(SIDES) else None))
            write_results(out, opts, argv, cfg, state, t_start, c_start, partial=True)
        latent_pairs = [p for p in state["pairs"] if not BASES[p["base"]].get("pictures")]
        if cfg["thread_check"] and opts.sides == list(SIDES) and latent_pairs:
            state["thread_check"] = thread_check(workers, latent_pairs[-1], cfg, default_lr)
    finally:
        workers.close()
    write_results(out, opts, argv, cfg, state, t_start, c_start)
    return 0


def make_pair(runs: list[dict], found: list[dict], cached: list[bool], default_lr: float) -> dict:
    """One base, rank and seed: its runs (marked cached or not) and the figures decided from them."""
    pair_runs = [{**f, "cached": c} for f, c in zip(found, cached, strict=True)]
    pictures = BASES[runs[0]["base"]].get("pictures")
    pair = {"base": runs[0]["base"], "rank": runs[0]["rank"], "seed": runs[0]["seed"], "runs": pair_runs,
            "pictures": bool(pictures), "decide": None}
    if default_lr is not None:
        pair["decide"] = (decide_pictures if pictures else decide)(pair_runs, default_lr)
    d = pair["decide"]
    if d is None:  # not every side ran: no figures to decide, the gap growth still for the curves
        for r in pair_runs:
            add_gaps(r["curve"], pair_runs[0]["curve"]["0"], (PICTURE_SPACE,) if pictures else SPACES)
        return pair
    if pictures:
        g = d["defaults"]
        say(f"{pair['base']} rank {pair['rank']} seed {pair['seed']}: frontier holds {d['frontier'][PICTURE_SPACE]['holds']}; "
            f"the defaults' frame {g['frame_last']:+.3f}, drift {fmt(g['drift_ratio_vs_lora'], 2)}x LoRA's")
        return pair
    say(f"{pair['base']} rank {pair['rank']} seed {pair['seed']}: frontier holds eps {d['frontier']['eps']['holds']}, "
        f"x0 {d['frontier']['x0']['holds']}; defaults' goals {'met' if d['defaults']['all'] else 'NOT met'}")
    return pair


def cpu_time() -> float:
    """CPU time of this process and its finished children (the workers, once shut down)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def write_results(out: Path, opts, argv, cfg, state: dict, t_start, c_start, partial=False) -> None:
    """The JSON and the markdown tables; after each base, rank and seed too (<label>-partial.*),
    so a run cut short keeps what it measured."""
    stamp = _dt.datetime.now(_dt.timezone.utc)
    label = opts.label or ("quick" if opts.quick else "full" if cfg.get("whole") else "subset")
    order = {(b, r, s): i for i, (b, r, s) in enumerate((b, r, s) for b in cfg["bases"]
                                                          for r in base_cfg(cfg, b)["ranks"]
                                                          for s in base_cfg(cfg, b)["seeds"])}
    pairs = state["pairs"] = sorted(state["pairs"], key=lambda p: order[(p["base"], p["rank"], p["seed"])])
    results = {
        "schema": SCHEMA_VERSION, "quick": opts.quick, "label": label, "time": stamp.isoformat(timespec="seconds"),
        "command": " ".join(["scripts/bench_method.py", *argv]), "threads": opts.threads,
        "config": cfg, "ours_overrides": opts.ours, "sides": opts.sides, **state,
        "seconds": time.perf_counter() - t_start,
        # this process and its workers (counted once they have exited: the final results only)
        "cpu_seconds": None if partial else cpu_time() - c_start,
        "train_cpu_seconds": sum(r["cpu_seconds"] for p in pairs for r in p["runs"] if not r["cached"]),
        "loadavg_end": os.getloadavg(),
        "frontier_holds": {s: all(p["decide"]["frontier"][s]["holds"] for p in pairs if p["decide"]
                                  and s in p["decide"]["frontier"]) for s in (*SPACES, PICTURE_SPACE)},
        "defaults_goals_met": all(p["decide"]["defaults"]["all"] for p in pairs if p["decide"]),
    }
    text = report(results)
    if partial:
        (out / f"{label}-partial.json").write_text(json.dumps(results, indent=1))
        (out / f"{label}-partial.md").write_text(text)
        return
    name = f"{label}-{stamp.strftime('%Y%m%d-%H%M%S')}"
    # latest.json is the full bench's: an experiment (--label) or the smoke run keeps its own latest
    suffix = "" if label == "full" else f"-{label}"
    for path in (out / f"{name}.json", out / f"latest{suffix}.json"):
        path.write_text(json.dumps(results, indent=1))
    for path in (out / f"{name}.md", out / f"latest{suffix}.md"):
        path.write_text(text)
    print(text)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
