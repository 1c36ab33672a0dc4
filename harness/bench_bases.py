"""Quantized and offloaded bases, measured side by side in one process (`make bench` section 7):
TrainTriLoRA on a float8 base (UNETLoader's fp8_e4m3fn, computed in the training dtype by
ComfyUI's manual cast), with ``offloading`` and with both, against the plain run on the same
weights stored in float32 (CPU) or bf16 (CUDA); and ComfyUI's TrainLoraNode on the same bases where
it has the option (float8: yes; offloading: only from 0.33 on, which 0.3.75's node lacks).

Runs go round robin (plain, float8, offloading, ... then rotated), each on a freshly loaded base,
after one uncounted warm-up run, and each figure is the median over rounds of the ratio to that
round's plain run.

Memory, per run: on CUDA torch.cuda.max_memory_allocated over memory_allocated before the run with
nothing loaded, so the weights the run puts on the card count (what offloading saves). On the CPU
torch keeps no allocator statistics, so: the weights' stored bytes (what float8 saves) plus the
process's peak RSS during the run over its RSS before it (VmHWM after a reset, /proc; the
training's own memory, including the per-layer copies the casts make). Offloading on the CPU
has nothing to move (the weights are in CPU memory already): its CPU rows show its cost only."""
from __future__ import annotations

import contextlib
import inspect

from . import TINY
from .bench import malloc_trim, median, ratio_summary, reset_peak_rss, status_kib

# name: (weight dtype, offloading, side)
VARIANTS = {
    "plain": ("plain", False, "ours"),
    "fp8": ("fp8", False, "ours"),
    "offloading": ("plain", True, "ours"),
    "fp8+offloading": ("fp8", True, "ours"),
    "theirs plain": ("plain", False, "theirs"),
    "theirs fp8": ("fp8", False, "theirs"),
    "theirs offloading": ("plain", True, "theirs"),
}


def load_base(host, weights: str):
    """The tiny checkpoint's UNet through UNETLoader's load (comfy.sd.load_diffusion_model), its
    weights stored as ``weights`` says: fp8 = float8_e4m3fn; plain = float32 on the CPU, bf16 on CUDA."""
    torch = host.torch
    dtype = torch.float8_e4m3fn if weights == "fp8" else torch.float32 if host.device == "cpu" else torch.bfloat16
    path = host.folder_paths.get_full_path_or_raise("checkpoints", TINY)
    with torch.inference_mode():
        return host.sd.load_diffusion_model(path, model_options={"dtype": dtype})


def stored_bytes(mp) -> int:
    return sum(t.nbytes for t in mp.model.diffusion_model.state_dict().values())


def theirs_has(host, name: str) -> bool:
    return name in inspect.signature(host.theirs.execute).parameters


def one_run(host, variant: str, latents, positive, cfg: dict) -> dict:
    """One training run of ``variant`` on a fresh base: step times and memory (module doc)."""
    torch, cuda = host.torch, host.device == "cuda"
    weights, offloading, side = VARIANTS[variant]
    dtype = "fp32" if host.device == "cpu" else "bf16"
    mp = load_base(host, weights)
    host.settle()
    malloc_trim()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        reset_peak_rss()
        before = status_kib("VmRSS") * 1024
    args = (mp, latents, positive, cfg["steps"], cfg["rank"], dtype, True)
    if side == "ours":
        kwargs = host.ours_inputs(*args)
        kwargs["offloading"] = [offloading]
        res = host._timed(lambda: host.ours.execute(**kwargs), settle=False)
    else:
        with _theirs_offloading(host, offloading):
            res = host.run_theirs(*args, settle=False)
    if cuda:
        res["memory_bytes"] = torch.cuda.max_memory_allocated() - before
    else:
        res["memory_bytes"] = stored_bytes(mp) + status_kib("VmHWM") * 1024 - before
    res["stored_bytes"] = stored_bytes(mp)
    del mp
    host.settle()
    return res


@contextlib.contextmanager
def _theirs_offloading(host, offloading: bool):
    """TrainLoraNode's own offloading input where it has one (0.33); the bench never runs it otherwise."""
    if not offloading:
        yield
        return
    real = host.theirs.execute

    def execute(**kwargs):  # over the schema default run_theirs passes
        return real(**{**kwargs, "offloading": [True]})

    execute.__signature__ = inspect.signature(real)  # run_theirs passes what the node's execute accepts
    host.theirs.execute = execute
    try:
        yield
    finally:
        host.theirs.execute = real


def section_bases(host, cfg: dict, say) -> dict:
    """Every variant once per round (rotated), ``cfg["bases_rounds"]`` rounds; ratios to plain."""
    variants = [v for v in VARIANTS if VARIANTS[v][2] == "ours" or (
        not VARIANTS[v][1] or theirs_has(host, "offloading"))]
    latents, positive = host.data(cfg["latent"])
    runs: dict = {v: [] for v in variants}
    errors: dict = {}
    one_run(host, "plain", latents, positive, cfg)  # warm-up, not counted: the process's first lazy allocations
    for r in range(cfg["bases_rounds"]):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for variant in order:
            if variant in errors:
                continue
            try:
                runs[variant].append(one_run(host, variant, latents, positive, cfg))
            except Exception as err:  # e.g. a TrainLoraNode that cannot train this base: recorded, not fatal
                errors[variant] = f"{type(err).__name__}: {str(err)[:300]}"
                host.settle()
        say(f"  round {r + 1}/{cfg['bases_rounds']}: " + ", ".join(
            f"{v} {runs[v][-1]['step_cpu_s']:.3f}s" for v in variants if runs[v] and len(runs[v]) == r + 1))
    rows = []
    for variant in variants:
        reference = "plain" if VARIANTS[variant][2] == "ours" else "theirs plain"
        if variant == reference or variant in errors or reference in errors:
            continue
        ours, ref = runs[variant], runs[reference]
        rows.append({"variant": variant, "reference": reference,
                     "step": ratio_summary([x["step_s"] for x in ours], [x["step_s"] for x in ref],
                                           [x["step_cpu_s"] for x in ours], [x["step_cpu_s"] for x in ref]),
                     "memory": ratio_summary([x["memory_bytes"] for x in ours], [x["memory_bytes"] for x in ref]),
                     "stored_bytes": median(x["stored_bytes"] for x in ours)})
    # Ours against TrainLoraNode on the same base, where it ran.
    for variant in ("plain", "fp8", "offloading"):
        theirs = f"theirs {variant}"
        if runs.get(variant) and runs.get(theirs):
            rows.append({"variant": variant, "reference": theirs,
                         "step": ratio_summary([x["step_s"] for x in runs[variant]], [x["step_s"] for x in runs[theirs]],
                                               [x["step_cpu_s"] for x in runs[variant]],
                                               [x["step_cpu_s"] for x in runs[theirs]]),
                         "memory": ratio_summary([x["memory_bytes"] for x in runs[variant]],
                                                 [x["memory_bytes"] for x in runs[theirs]])})
    absent = [] if theirs_has(host, "offloading") else ["TrainLoraNode has no offloading input in this ComfyUI"]
    return {"rows": rows, "errors": errors, "notes": absent, "raw": runs,
            "setting": {"latent": cfg["latent"], "rank": cfg["rank"], "steps": cfg["steps"], "checkpointing": True}}


def summary(bases: dict, add) -> None:
    """Section 7's rows for bench.py's table: ``add(name, label, ratio_summary dict, **unit)``."""
    st = bases["setting"]
    where = f"rank {st['rank']}, latent {st['latent']}, checkpointing on"
    for row in bases["rows"]:
        label = f"7. {row['variant']} / {row['reference']} ({where})"
        add("bases_step", f"{label}: step", row["step"])
        add("bases_memory", f"{label}: memory (module doc of harness/bench_bases.py)", row["memory"],
            unit_scale=1 / 2**20, unit="MiB")
