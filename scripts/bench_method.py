#!/usr/bin/env python
"""`make bench-method`: does TriLoRA keep its promise over LoRA? Less overfitting and less drift
of the base model at equal fit, measured on a pretrained tiny model, in the real ComfyUI.

1. A base model: SD1.5-shaped (ComfyUI's own SD15 config and BaseModel: eps prediction, its
   noise schedule, CLIP-L-sized context, its LoRA key map) with the one-level UNet of the test
   fixture (harness/fixtures/tiny.py) at 64 channels instead of 320, so that 12 runs of
   a few hundred steps fit in minutes on a CPU. Pretrained here in latent space from a fixed seed on
   procedural captioned data: six classes of latent pictures (stripes, blobs, checks, ramps ...;
   each with its own colour mix and a fixed random caption embedding shaped like CLIP-L's
   output). Cached in bench_output/method/, so the second run starts at once.
2. Personalisation: N = 4 pictures of a style the base never saw (rings, a new colour mix, a
   new caption), trained with TrainTriLoRA at its defaults and ComfyUI's TrainLoraNode at its
   defaults: same rank, steps, data and seed, both called in-process as ComfyUI's executor
   calls them (under torch.inference_mode). Precision is fp32 for both (a CPU run; the other
   defaults are each node's own). Sides alternate A B / B A over seeds.
3. At checkpoints (ComfyUI's progress hook, which both nodes drive once per optimizer step) the
   model being trained is measured on fixed noise at 5 fixed noise levels:
   train loss (the 4 pictures), held-out loss (8 other pictures of the style: the fit that
   matters) and base drift (mean squared change of the prediction on 12 of the base model's own
   pictures and captions), each as the model's own eps error and as x0 error (the denoised
   image's, which weighs the noisiest levels by sigma^2, as TrainLoraNode's loss does).
4. The deciding figures, per seed and as mean +- spread (sample std) over seeds: base drift at
   matched held-out fit (ours interpolated along its curve at the held-out loss TrainLoraNode
   has at the last step, against TrainLoraNode's drift there), generalisation-gap growth at
   matched train fit (the same at TrainLoraNode's last train loss), gap growth at the last step,
   and the goal: ours reaches their held-out fit within the steps, its gap growth
   at the last step is no larger, its drift at matched held-out fit <= 0.7x theirs, every seed.

    .venv/bin/python scripts/bench_method.py           # full run (make bench-method), < 30 min on 2 CPU cores
    .venv/bin/python scripts/bench_method.py --quick   # smoke run (tests/comfy/test_bench_method_smoke.py)
    .venv/bin/python scripts/bench_method.py --ranks 4 --seeds 0 --ours s_learning_rate_scale=0.3 --label x
                                                       # an experiment: TrainLoraNode's runs come from the cache

Results: bench_output/method/<label>-<time>.json, latest.json and latest.md (--out to change).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import functools
import hashlib
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: harness
from harness import REPO  # noqa: E402
from harness.bench import BenchHost as Host  # noqa: E402
from harness.bench import machine_info  # noqa: E402

SCHEMA_VERSION = 1
LEVELS = (0.1, 0.3, 0.5, 0.7, 0.9)  # fixed noise levels, as ComfyUI's timestep percent

FULL = {
    "channels": 64,           # model_channels of the SD1.5-shaped UNet (SD1.5: 320)
    "latent": 8,              # latent side (64 px): the UNet has one level, 64 tokens
    "pretrain_steps": 600,
    "pretrain_batch": 16,
    "pretrain_lr": 1e-3,
    "pictures_per_class": 64,  # pretraining pool per base class
    "train_pictures": 4,
    "heldout_pictures": 8,
    "base_pictures": 2,       # per base class, for the drift measurement
    "steps": 200,             # --steps 400 for a longer look (the checkpoints double up to it)
    "checkpoints": [25, 50, 100, 200, 400],
    "ranks": [4, 16],
    "seeds": [0, 1, 2],
}
QUICK = {**FULL, "channels": 32, "latent": 4, "pretrain_steps": 3, "pretrain_batch": 4, "pictures_per_class": 2,
         "heldout_pictures": 2, "base_pictures": 1, "steps": 4, "checkpoints": [2, 4], "ranks": [2], "seeds": [0]}

GOAL_DRIFT_RATIO = 0.7


def say(text: str) -> None:
    print(f"[bench-method] {text}", flush=True)


# =========================================================================== data


def _pattern(kind: str, gen, side: int, torch):
    """One [side, side] pattern of a family, random phase/position, zero mean, unit std."""
    r = lambda *shape: torch.rand(*shape, generator=gen)  # noqa: E731
    ax = torch.linspace(-1, 1, side)
    y, x = torch.meshgrid(ax, ax, indexing="ij")
    phase = r(1) * 2 * math.pi
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
    elif kind == "rings":  # the style the base never sees
        c = r(2) - 0.5
        p = torch.cos(5 * math.pi * torch.sqrt((x - c[0]) ** 2 + (y - c[1]) ** 2) + phase)
    else:
        raise ValueError(kind)
    p = p - p.mean()
    return p / p.std().clamp_min(1e-6)


BASE_KINDS = ("stripes_h", "stripes_d", "blobs", "checks", "ramp", "stripes_v")
STYLE_KIND = "rings"


class Data:
    """Procedural latents in the model's own space (what it denoises: process_latent_in of a
    LATENT) and one caption embedding per class, all from fixed seeds."""

    def __init__(self, cfg: dict, torch):
        self.torch, self.side = torch, cfg["latent"]
        g = torch.Generator().manual_seed(20261130)
        kinds = (*BASE_KINDS, STYLE_KIND)
        self.mix = {k: torch.randn(4, generator=g) for k in kinds}  # colour mix per class
        self.caption = {k: torch.randn(1, 77, 768, generator=g) for k in kinds}
        self.pool = {k: self.pictures(k, cfg["pictures_per_class"], f"pool-{k}") for k in BASE_KINDS}
        self.train = self.pictures(STYLE_KIND, cfg["train_pictures"], "style-train")
        self.heldout = self.pictures(STYLE_KIND, cfg["heldout_pictures"], "style-heldout")
        self.base = {k: self.pictures(k, cfg["base_pictures"], f"base-{k}") for k in BASE_KINDS}

    def pictures(self, kind: str, n: int, stream: str):
        torch = self.torch
        g = torch.Generator().manual_seed(int(hashlib.sha256(stream.encode()).hexdigest()[:12], 16))
        out = []
        for _ in range(n):
            p = _pattern(kind, g, self.side, torch)
            out.append(self.mix[kind][:, None, None] * p + 0.1 * torch.randn(4, self.side, self.side, generator=g))
        return torch.stack(out)


# =========================================================================== the base model


def build_base(host: Host, cfg: dict):
    """An SD1.5-shaped model (ComfyUI's SD15 config and BaseModel: eps prediction, its noise
    schedule, CLIP-L-sized context, its key map) with the test fixture's one-level UNet at
    ``cfg["channels"]`` wide, weights filled as the fixture's are; a ModelPatcher on the CPU."""
    import comfy.model_patcher
    import comfy.supported_models

    from harness.fixtures.tiny import SEED, UNET_CONFIG, fill

    torch = host.torch
    config = comfy.supported_models.SD15({**UNET_CONFIG, "model_channels": cfg["channels"], "num_res_blocks": [1],
                                          "adm_in_channels": None,
                                          "use_temporal_attention": False})
    model = config.get_model({}, device="cpu")
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for key, value in model.diffusion_model.state_dict().items():
            value.copy_(fill(key, value.shape, g))
    return comfy.model_patcher.ModelPatcher(model, load_device=host.mm.get_torch_device(),
                                            offload_device=host.mm.unet_offload_device())


def pretrain_key(cfg: dict) -> str:
    keys = ("channels", "latent", "pretrain_steps", "pretrain_batch", "pretrain_lr", "pictures_per_class")
    text = json.dumps({k: cfg[k] for k in keys}, sort_keys=True) + (Path(__file__).read_text().split("# ==")[1])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def pretrain(host: Host, model, data: Data, cfg: dict, cache: Path) -> dict:
    """Trains the whole UNet on the base classes (eps MSE, uniform noise levels), or loads the
    cached result. Returns {"cached": bool, "seconds": float, "loss": [...]}."""
    torch = host.torch
    from safetensors.torch import load_file, save_file

    unet = model.model.diffusion_model
    path = cache / f"base-{pretrain_key(cfg)}.safetensors"
    if path.exists():
        unet.load_state_dict(load_file(str(path)))
        return {"cached": True, "seconds": 0.0, "file": str(path)}
    t0 = time.perf_counter()
    base, ms = model.model, model.model.model_sampling
    unet.train(False)
    params = [p for p in unet.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg["pretrain_lr"])
    g = torch.Generator().manual_seed(0)
    pool = torch.cat([data.pool[k] for k in BASE_KINDS])
    labels = [k for k in BASE_KINDS for _ in range(len(data.pool[k]))]
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
    cache.mkdir(parents=True, exist_ok=True)
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
        sets = {"train": (data.train, data.caption[STYLE_KIND]),
                "heldout": (data.heldout, data.caption[STYLE_KIND]),
                "base": (torch.cat([data.base[k] for k in BASE_KINDS]),
                         torch.cat([data.caption[k] for k in BASE_KINDS for _ in range(len(data.base[k]))]))}
        self.sets = {}
        for name, (x0, ctx) in sets.items():
            n = len(x0)
            x0 = x0.repeat(len(LEVELS), 1, 1, 1)
            ctx = ctx.expand(n, -1, -1) if ctx.shape[0] == 1 else ctx
            ctx = ctx.repeat(len(LEVELS), 1, 1)
            sigma = torch.tensor([float(ms.percent_to_sigma(p)) for p in LEVELS]).repeat_interleave(n)
            noise = torch.randn(x0.shape, generator=g)
            coeff = ms.calculate_denoised(sigma, torch.ones_like(x0), torch.zeros_like(x0))
            self.sets[name] = (ms.noise_scaling(sigma, noise, x0, False), sigma, ctx, x0, coeff)
        self.reference = {name: self.predict(name) for name in self.sets}  # the base model's own
        self.start = self.measure()  # step 0 of every curve

    def predict(self, name: str):
        torch = self.torch
        xt, sigma, ctx, x0, coeff = self.sets[name]
        with torch.no_grad():
            return torch.cat([self.base.apply_model(xt[i:i + 40], sigma[i:i + 40], c_crossattn=ctx[i:i + 40])
                              for i in range(0, len(xt), 40)]).float()

    def measure(self) -> dict:
        out = {}
        for name in ("train", "heldout", "base"):
            _, _, _, x0, coeff = self.sets[name]
            denoised = self.predict(name)
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
    kwargs = {}
    for inp in node.define_schema().inputs:
        if getattr(inp, "default", None) is not None:
            kwargs[inp.id] = [inp.default]
    return kwargs


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


def train_run(host: Host, side: str, model, data: Data, probe: Probe, rank: int, seed: int, cfg: dict,
              overrides: dict) -> dict:
    """Trains one side from the pretrained base, measuring at the checkpoints; returns the curve."""
    torch = host.torch
    node = host.ours if side == "ours" else host.theirs
    kwargs = node_defaults(node)
    latents = [{"samples": model.model.process_latent_out(data.train[i:i + 1].clone())}
               for i in range(len(data.train))]
    kwargs.update(model=[model], latents=latents, positive=[[[data.caption[STYLE_KIND].clone(), {}]]],
                  steps=[cfg["steps"]], rank=[rank], seed=[seed], training_dtype=["fp32"])
    if side == "theirs":
        kwargs.update(lora_dtype=["fp32"], existing_lora=["[None]"])
    else:
        kwargs.update(overrides)
    curve = {0: dict(probe.start)}
    marks = set(cfg["checkpoints"])

    def hook(value, total, preview=None, node_id=None):
        if value in marks and value not in curve:
            curve[value] = probe.measure()
            say(f"  {side} rank {rank} seed {seed} step {value}: held-out {curve[value]['heldout_eps']:.4f}, "
                f"drift {curve[value]['drift_eps']:.4f}")

    host.settle()
    torch.manual_seed(seed)  # TrainLoraNode draws its init, order and noise levels from the global RNG
    host.utils.set_progress_bar_global_hook(hook)
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            node.execute(**kwargs)
    finally:
        host.utils.set_progress_bar_global_hook(None)
        host.settle()
    missing = marks - set(curve)
    if missing:
        raise RuntimeError(f"{side}: no measurement at steps {sorted(missing)} (progress hook not called)")
    return {"curve": {str(k): curve[k] for k in sorted(curve)}, "seconds": time.perf_counter() - t0}


# =========================================================================== the deciding figures


def at_level(curve: dict, key: str, level: float, want: str):
    """`want` interpolated (linearly, between checkpoints) where `key` first falls to `level`
    along the curve; None if it never does."""
    pts = [curve[s] for s in sorted(curve, key=int)]
    for a, b in zip(pts, pts[1:], strict=False):
        if b[key] <= level:
            if a[key] <= level:
                return a[want]
            t = (a[key] - level) / (a[key] - b[key])
            return a[want] + t * (b[want] - a[want])
    return None


def gap(point: dict, space: str, start: dict) -> float:
    """Generalisation-gap growth: (held-out - train) now, minus the base model's."""
    return (point[f"heldout_{space}"] - point[f"train_{space}"]) - (start[f"heldout_{space}"] - start[f"train_{space}"])


def decide(ours: dict, theirs: dict, space: str) -> dict:
    co, ct = ours["curve"], theirs["curve"]
    last = str(max(int(s) for s in ct))
    start = co["0"]
    for c in (co, ct):
        for p in c.values():
            p[f"gap_{space}"] = gap(p, space, start)
    h_theirs, t_theirs = ct[last][f"heldout_{space}"], ct[last][f"train_{space}"]
    drift_ours = at_level(co, f"heldout_{space}", h_theirs, f"drift_{space}")
    drift_theirs = ct[last][f"drift_{space}"]
    gap_ours_matched = at_level(co, f"train_{space}", t_theirs, f"gap_{space}")
    reach = next((int(s) for s in sorted(co, key=int) if co[s][f"heldout_{space}"] <= h_theirs), None)
    row = {
        "heldout_ours": co[last][f"heldout_{space}"], "heldout_theirs": h_theirs,
        "best_heldout_ours": min(p[f"heldout_{space}"] for p in co.values()),
        "train_ours": co[last][f"train_{space}"], "train_theirs": t_theirs,
        "gap_ours": co[last][f"gap_{space}"], "gap_theirs": ct[last][f"gap_{space}"],
        "drift_ours": co[last][f"drift_{space}"], "drift_theirs": drift_theirs,
        "reaches_heldout_at_step": reach,
        "drift_at_matched_heldout_ours": drift_ours,
        "drift_ratio_at_matched_heldout": None if drift_ours is None else drift_ours / drift_theirs,
        "gap_at_matched_train_ours": gap_ours_matched, "gap_at_matched_train_theirs": ct[last][f"gap_{space}"],
    }
    row["goal_reach"] = reach is not None
    row["goal_gap"] = row["gap_ours"] <= row["gap_theirs"]
    row["goal_drift"] = row["drift_ratio_at_matched_heldout"] is not None and \
        row["drift_ratio_at_matched_heldout"] <= GOAL_DRIFT_RATIO
    row["goal"] = row["goal_reach"] and row["goal_gap"] and row["goal_drift"]
    return row


def mean_sd(values):
    values = [v for v in values if v is not None and not isinstance(v, bool)]
    if not values:
        return None, None
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(value, digits=3) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}" if abs(value) >= 10 ** -digits or value == 0 else f"{value:.1e}"


def pm(values, digits=3) -> str:
    m, s = mean_sd(values)
    return "n/a" if m is None else f"{fmt(m, digits)} ± {fmt(s, digits)}"


def column(rows: list[dict], key: str) -> list:
    return [r[key] for r in rows]


def mean_of(points: list[dict], key: str) -> float:
    return statistics.mean(p[key] for p in points)


def report(results: dict) -> str:
    lines = [f"# bench-method ({results['label']}, {results['time']})", "",
             f"Machine: {results['machine'].get('cpu')}, {results['machine'].get('cores')} cores, torch "
             f"{results['machine'].get('torch')}. Command: `{results['command']}`. Wall time {results['seconds']:.0f} s.",
             f"TrainTriLoRA overrides: {results['ours_overrides'] or 'none (defaults)'}.", ""]
    for space in ("eps", "x0"):
        lines += [f"## Deciding figures ({space} error; mean ± sd over seeds {results['config']['seeds']}, "
                  f"step {results['config']['steps']})", "",
                  "| rank | held-out ours / theirs | gap growth ours / theirs | drift ours / theirs | "
                  "drift at matched held-out: ours / theirs (ratio per seed) | gap at matched train: ours / theirs "
                  "| reaches held-out at step | goal met per seed |",
                  "|---|---|---|---|---|---|---|---|"]
        for rank in results["config"]["ranks"]:
            rows = [r["decide"][space] for r in results["pairs"] if r["rank"] == rank]
            if not rows:
                continue
            g = functools.partial(column, rows)
            ratios = ", ".join(fmt(v, 2) for v in g("drift_ratio_at_matched_heldout"))
            lines.append(
                f"| {rank} | {pm(g('heldout_ours'))} / {pm(g('heldout_theirs'))} | {pm(g('gap_ours'))} / "
                f"{pm(g('gap_theirs'))} | {pm(g('drift_ours'))} / {pm(g('drift_theirs'))} | "
                f"{pm(g('drift_at_matched_heldout_ours'))} / {pm(g('drift_theirs'))} ({ratios}) | "
                f"{pm(g('gap_at_matched_train_ours'))} / {pm(g('gap_at_matched_train_theirs'))} | "
                f"{', '.join(str(v) for v in g('reaches_heldout_at_step'))} | "
                f"{' '.join('yes' if v else 'no' for v in g('goal'))} |")
        lines.append("")
    lines += ["## Curves (eps error, mean over seeds)", "",
              "| rank | side | step | train | held-out | gap growth | drift | train x0 | held-out x0 | drift x0 |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for rank in results["config"]["ranks"]:
        pairs = [r for r in results["pairs"] if r["rank"] == rank]
        for side in ("theirs", "ours"):
            if not pairs:
                continue
            for step in pairs[0][side]["curve"]:
                pts = [r[side]["curve"][step] for r in pairs]
                m = functools.partial(mean_of, pts)
                lines.append(f"| {rank} | {'TrainTriLoRA' if side == 'ours' else 'TrainLoraNode'} | {step} | "
                             f"{fmt(m('train_eps'))} | {fmt(m('heldout_eps'))} | {fmt(m('gap_eps'))} | "
                             f"{fmt(m('drift_eps'), 4)} | {fmt(m('train_x0'))} | {fmt(m('heldout_x0'))} | "
                             f"{fmt(m('drift_x0'), 4)} |")
    return "\n".join(lines) + "\n"


# =========================================================================== main


def from_cache(path: Path, rank: int, seed: int, cfg: dict) -> dict | None:
    """A cached TrainLoraNode run of this rank and seed that measured at every checkpoint asked
    for (a longer run serves a shorter one: the loop does not depend on the step count), cut to them."""
    if not path.exists():
        return None
    want = ["0", *map(str, cfg["checkpoints"])]
    for key, run in json.loads(path.read_text()).items():
        if key.startswith(f"r{rank}-s{seed}-") and set(want) <= set(run["curve"]):
            return {**run, "curve": {k: run["curve"][k] for k in want}, "cached": key}
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, a few steps (seconds)")
    parser.add_argument("--out", default=str(REPO / "bench_output" / "method"), help="folder for results and the cache")
    parser.add_argument("--ranks", type=int, nargs="*", help="override the ranks")
    parser.add_argument("--seeds", type=int, nargs="*", help="override the seeds")
    parser.add_argument("--steps", type=int, help="override the steps (checkpoints above it are dropped)")
    parser.add_argument("--ours", default="", help="TrainTriLoRA inputs to override, e.g. alpha=4,s_learning_rate_scale=0.3")
    parser.add_argument("--label", default="", help="a name for this run's result files")
    parser.add_argument("--fresh-theirs", action="store_true", help="re-run TrainLoraNode even where cached")
    parser.add_argument("--wait-theirs", action="store_true",
                        help="wait for another run to cache TrainLoraNode's runs instead of running them")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    argv = sys.argv[1:] if argv is None else argv
    opts = parser.parse_args(argv)
    cfg = dict(QUICK if opts.quick else FULL)
    if opts.ranks:
        cfg["ranks"] = opts.ranks
    if opts.seeds is not None and opts.seeds:
        cfg["seeds"] = opts.seeds
    cfg["steps"] = opts.steps or cfg["steps"]
    cfg["checkpoints"] = sorted({c for c in cfg["checkpoints"] if c < cfg["steps"]} | {cfg["steps"]})
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    host = Host("cpu", opts.threads)
    torch = host.torch
    model = build_base(host, cfg)
    data = Data(cfg, torch)
    say(f"base model: pretraining (or cache) in {out}")
    base_info = pretrain(host, model, data, cfg, out)
    say(f"  {base_info}")
    probe = Probe(model, data, torch)
    say(f"  base model: {json.dumps({k: round(v, 4) for k, v in probe.start.items()})}")
    overrides = parse_overrides(opts.ours, host.ours)
    cache_path = out / f"theirs-{pretrain_key(cfg)}.json"
    if opts.quick:
        cache_path = out / f"theirs-quick-{os.getpid()}.json"  # never reused
    pairs = []
    n = 0
    for rank in cfg["ranks"]:
        for seed in cfg["seeds"]:
            key = f"r{rank}-s{seed}-n{cfg['steps']}-c{','.join(map(str, cfg['checkpoints']))}"
            runs = {}
            order = ("ours", "theirs") if n % 2 == 0 or opts.wait_theirs else ("theirs", "ours")
            n += 1
            for side in order:
                cached = None if opts.fresh_theirs or side == "ours" else from_cache(cache_path, rank, seed, cfg)
                while side == "theirs" and opts.wait_theirs and cached is None:  # another run computes it
                    time.sleep(10)
                    cached = from_cache(cache_path, rank, seed, cfg)
                if cached is not None:
                    runs[side] = cached
                    continue
                runs[side] = train_run(host, side, model, data, probe, rank, seed, cfg, overrides)
                if side == "theirs":  # merged: experiments may run side by side
                    cache = {**(json.loads(cache_path.read_text()) if cache_path.exists() else {}), key: runs[side]}
                    tmp = cache_path.with_suffix(f".{os.getpid()}.tmp")
                    tmp.write_text(json.dumps(cache))
                    os.replace(tmp, cache_path)
            row = {"rank": rank, "seed": seed, **runs,
                   "decide": {space: decide(runs["ours"], runs["theirs"], space) for space in ("eps", "x0")}}
            pairs.append(row)
            d = row["decide"]["eps"]
            say(f"rank {rank} seed {seed}: held-out ours {d['heldout_ours']:.4f} theirs {d['heldout_theirs']:.4f}; "
                f"gap {d['gap_ours']:.4f} / {d['gap_theirs']:.4f}; drift {d['drift_ours']:.4f} / "
                f"{d['drift_theirs']:.4f}; drift at matched held-out {fmt(d['drift_at_matched_heldout_ours'], 4)} "
                f"(ratio {fmt(d['drift_ratio_at_matched_heldout'], 2)}); gap at matched train "
                f"{fmt(d['gap_at_matched_train_ours'], 4)}; goal {'met' if d['goal'] else 'NOT met'} "
                f"[{runs['ours']['seconds']:.0f}s]")
            write_results(out, opts, argv, cfg, base_info, probe, pairs, t_start, partial=True)
    write_results(out, opts, argv, cfg, base_info, probe, pairs, t_start)
    return 0


def write_results(out: Path, opts, argv, cfg, base_info, probe, pairs, t_start, partial=False) -> None:
    """The JSON and the markdown table; after each pair too (<label>-partial.*), so a run cut
    short keeps what it measured."""
    stamp = _dt.datetime.now(_dt.timezone.utc)
    label = opts.label or ("quick" if opts.quick else "full")
    results = {
        "schema": SCHEMA_VERSION, "quick": opts.quick, "label": label, "time": stamp.isoformat(timespec="seconds"),
        "command": " ".join(["scripts/bench_method.py", *argv]),
        "machine": machine_info(), "config": cfg, "ours_overrides": opts.ours, "base_model": base_info,
        "base_measure": probe.start, "pairs": pairs, "seconds": time.perf_counter() - t_start,
    }
    results["goal_met"] = all(p["decide"]["eps"]["goal"] for p in pairs)
    text = report(results)
    if partial:
        (out / f"{label}-partial.json").write_text(json.dumps(results, indent=1))
        (out / f"{label}-partial.md").write_text(text)
        return
    name = f"{label}-{stamp.strftime('%Y%m%d-%H%M%S')}"
    (out / f"{name}.json").write_text(json.dumps(results, indent=1))
    (out / f"{name}.md").write_text(text)
    suffix = "-quick" if opts.quick else ""
    (out / f"latest{suffix}.json").write_text(json.dumps(results, indent=1))
    (out / f"latest{suffix}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
