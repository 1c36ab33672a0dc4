#!/usr/bin/env python
"""`make bench`: TriLoRA against ComfyUI's own LoRA, side by side, in the real ComfyUI.

What is measured (see BENCHMARKS.md for what each figure means):

1. training step: TrainTriLoRA vs ComfyUI's TrainLoraNode (LoRA), same rank, steps, data, dtype,
   optimizer, loss, gradient checkpointing off. A step's time is the interval between two
   progress-bar updates (ComfyUI's global progress hook, which both nodes drive once per
   optimizer step), the first step left out: setup, the first step's lazy allocations and the
   result's post-processing never count. The median over the run's steps is the run's figure.
2. adapter overhead: a TrainTriLoRA step vs the same node's step with no adapter: only the first
   layer (input_blocks.0.0, a 4-channel conv) keeps a tiny adapter, so the backward still runs
   through every layer (activation gradients, as with adapters everywhere) and costs nothing else.
3. load and patch: TriLoRALoader vs LoraLoader on equal-rank files over the same layers (the
   TriLoRA file and its exact LoRA equivalent, up = U diag(s), down = Vt), node plus
   comfy.model_management.load_models_gpu (which patches the weights) plus the unload (which
   restores them). "cold": the file is read and parsed (our cache cleared, a fresh LoraLoader);
   "warm": both nodes' own caches hold it (a re-run with another strength).
4. training memory: each side in a fresh subprocess (clean peak): peak RSS (VmHWM, reset after
   the model load where the kernel allows, else ru_maxrss) minus the RSS after the model load;
   on CUDA max_memory_allocated minus memory_allocated after the model load.
5. scaling: step-time ratio against rank and latent size; load-and-patch ratio against rank.
6. full size: SD1.5 (fp32) and SDXL (bf16) UNets from ComfyUI's own configs with random weights
   (on CUDA: SD1.5 at 512 px, SDXL at 1024 px, bf16), built and trained as the executor runs
   them, under torch.inference_mode; gradient checkpointing on and off: step time and peak
   memory against TrainLoraNode, the adapter's memory against its analytic size, TrainTriLoRA
   under inference mode against plain weights, and its cost against rank and latent size.
   Its own worker process; `--set` sizes it (see BENCHMARKS.md for the settings run).
   `scripts/bench_gpu.py` (make bench-gpu) is the GPU run with Flux.
7. quantized and offloaded bases (harness/bench_bases.py): TrainTriLoRA on a float8 base, with
   offloading and with both, against the plain run; TrainLoraNode on the same bases where it has
   the option. Step time and memory as ratios to the plain run, round robin in one process.
8. training data (harness/bench_data.py): Encode Training Dataset reading its cache, and encoding
   while writing it, against encoding with no cache; the step that trains the text encoders
   against the UNet-only step.

Sides run alternately in ONE process (A B A B ...), and each figure is the median of the per-pair
ratios ours / theirs: the machine is shared and noisy, ratios of neighbouring runs are stable
where absolute times are not. Absolute times are reported as context only. On the CPU the
workers run torch with one thread (--threads 1, the default) and time figures are judged on
process CPU time, which the other processes of a shared machine do not inflate (with 2 threads,
OpenMP waits for a descheduled thread and one step's time varied 6x); --threads 0 keeps torch's
default and judges on wall time. Both times are always recorded.

    .venv/bin/python scripts/bench.py            # full run (make bench); section 6 is most of it
    .venv/bin/python scripts/bench.py --quick    # smoke run (tests/comfy/test_bench_smoke.py)

Results: bench_output/bench-<time>.json (raw), bench_output/latest.json, bench_output/latest.md.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import functools
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: harness
from harness import REPO, bench_bases, bench_data  # noqa: E402
from harness.bench import (  # noqa: E402
    BenchHost,
    analytic_adapter_bytes,
    compare,
    family_data,
    fmt,
    full_size_model,
    machine_info,
    malloc_trim,
    measured_run,
    median,
    pairs,
    ratio_summary,
    reset_peak_rss,
    status_kib,
)

SCHEMA_VERSION = 1

# name -> (goal for ours / theirs, stretch goal or None)
GOALS = {
    "train_step": (1.0, 0.8),
    "adapter_overhead": (1.15, None),
    "load_patch_cold": (1.05, None),
    "load_patch_warm": (1.05, None),
    "train_memory": (1.0, None),
    "full_step": (0.8, None),
    "full_memory": (0.5, None),
    "full_adapter": (1.1, None),   # measured / analytic: within 10% either way
    "executor_step": (1.0, None),  # under the executor's inference mode / outside it
    "executor_memory": (1.0, None),
}

FULL = {
    "latent": 16,         # latent side (x8 = pixels): 16 -> 128 px, 256 tokens in the tiny UNet
    "rank": 8,
    "steps": 5,           # per training run; the first step is left out of the per-step figure
    "rounds": 7,          # A/B(/base) rounds for sections 1-2
    "load_rounds": 7,
    "mem_steps": 3,
    "mem_pairs": 2,
    "scale_ranks": [4, 16, 32, 64, 128],   # rank 8 is section 1
    "scale_latents": [8, 32],              # latent 16 is section 1
    "scale_steps": 4,
    "scale_pairs": 2,
    "patch_ranks": [4, 16, 32, 64, 128],   # rank 8 is section 3
    "patch_pairs": 3,
    "clip": True,         # loaders get CLIP-L too (their key maps cover it); --quick leaves it out
    # section 6, full size: (family, weight dtype, latent side) per model; on the CPU fp32 weights
    # train in fp32, bf16 weights in bf16 (autocast). Sizes chosen for 2 shared cores: see BENCHMARKS.md.
    "fs_models": [["SD15", "fp32", 16], ["SDXL", "bf16", 16]],
    "fs_models_cuda": [["SD15", "bf16", 64], ["SDXL", "bf16", 128]],
    "fs_rank": 16,
    "fs_steps": 3,        # the first step is left out of the step time
    "fs_pairs": 1,        # A B (then B A ...) per model and checkpointing setting (0: only the scaling rows)
    "fs_checkpointing": [True, False],
    "fs_executor_pairs": 1,             # ours under inference mode vs plain weights (0: off)
    "fs_scale_ranks": [4, 128],         # fs_rank is the main rows (first model only)
    "fs_scale_latents": [8, 32],
    "fs_scale_pairs": 1,
    "fs_scale_theirs": False,           # True: TrainLoraNode too (it costs ~5x our CPU time per run)
    "bases_rounds": 5,                  # section 7: rounds of every variant
    "data_rounds": 3,                   # section 8: rounds of the cache and text-encoder variants
    "data_images": 8,
    "data_side": 128,
}

QUICK = {
    **FULL,
    "latent": 8, "steps": 3, "rounds": 1, "load_rounds": 1, "mem_steps": 2, "mem_pairs": 1,
    "scale_ranks": [4], "scale_latents": [4], "scale_steps": 2, "scale_pairs": 1,
    "patch_ranks": [4], "patch_pairs": 1, "clip": False,
    "fs_models": [["tiny", "fp32", 8]], "fs_models_cuda": [["tiny", "bf16", 8]], "fs_rank": 4, "fs_steps": 2,
    "fs_pairs": 1, "fs_checkpointing": [True], "fs_executor_pairs": 1, "fs_scale_ranks": [8], "fs_scale_latents": [],
    "fs_scale_theirs": True, "bases_rounds": 1, "data_rounds": 1, "data_images": 2, "data_side": 64,
}


def say(text: str) -> None:
    print(f"[bench] {text}", flush=True)


# =========================================================================== worker side: ComfyUI


class Host(BenchHost):
    """The measuring host (harness.bench) with section 2's no-adapter baseline."""

    def run_ours(self, model, latents, positive, steps, rank, dtype, checkpointing, only_first=False,
                 settle: bool = True) -> dict:
        kwargs = self.ours_inputs(model, latents, positive, steps, rank, dtype, checkpointing)
        if not only_first:
            return self._timed(lambda: self.ours.execute(**kwargs), settle)
        # The no-adapter baseline: one tiny adapter on the first layer only (see the module doc).
        find = self.train_mod.find_targets

        def first_only(mp, target):
            found = [t for t in find(mp, target) if t.name.endswith("input_blocks.0.0")]
            return found or find(mp, target)[:1]

        class FirstLayerOnly(self.ours):  # the node's seam: which layers train
            select_targets = staticmethod(first_only)

        return self._timed(lambda: FirstLayerOnly.execute(**kwargs))


def training_dtype(device: str) -> str:
    return "fp32" if device == "cpu" else "bf16"


# ---------------------------------------------------------------- sections 1 + 2


def section_train(host: Host, cfg: dict, model) -> dict:
    latents, positive = host.data(cfg["latent"])
    dtype, steps, rank = training_dtype(host.device), cfg["steps"], cfg["rank"]
    runs = {"ours": [], "theirs": [], "base": []}
    orders = [("ours", "theirs", "base"), ("theirs", "base", "ours"), ("base", "ours", "theirs")]
    for r in range(cfg["rounds"]):
        for side in orders[r % 3]:
            if side == "ours":
                res = host.run_ours(model, latents, positive, steps, rank, dtype, False)
            elif side == "theirs":
                res = host.run_theirs(model, latents, positive, steps, rank, dtype, False)
            else:
                res = host.run_ours(model, latents, positive, steps, rank, dtype, False, only_first=True)
            runs[side].append(res)
        say(f"  round {r + 1}/{cfg['rounds']}: step (wall / cpu time) ours {runs['ours'][-1]['step_s']:.3f}/"
            f"{runs['ours'][-1]['step_cpu_s']:.3f}s, theirs {runs['theirs'][-1]['step_s']:.3f}/"
            f"{runs['theirs'][-1]['step_cpu_s']:.3f}s, no adapter {runs['base'][-1]['step_s']:.3f}/"
            f"{runs['base'][-1]['step_cpu_s']:.3f}s")
    step = {k: [x["step_s"] for x in v] for k, v in runs.items()}
    cpu = {k: [x["step_cpu_s"] for x in v] for k, v in runs.items()}
    total = {k: [x["total_s"] for x in v] for k, v in runs.items()}
    total_cpu = {k: [x["total_cpu_s"] for x in v] for k, v in runs.items()}
    setting = {"latent": cfg["latent"], "rank": rank, "steps": steps, "dtype": dtype, "checkpointing": False}

    def pair(a, b, unit):
        return {**ratio_summary(step[a], step[b], cpu[a], cpu[b]), "unit": unit, "setting": setting}

    return {
        "train_step": pair("ours", "theirs", "s/step"),
        "adapter_overhead": pair("ours", "base", "s/step"),
        "theirs_overhead": pair("theirs", "base", "s/step"),
        "node_total": {**ratio_summary(total["ours"], total["theirs"], total_cpu["ours"], total_cpu["theirs"]),
                       "unit": "s/run", "setting": setting},
        "raw": runs,
    }


# ---------------------------------------------------------------- section 3


def write_files(host: Host, model, rank: int, seed: int = 0) -> tuple[str, str, int]:
    """A TriLoRA file over every layer TrainTriLoRA adapts by default, and its exact LoRA twin."""
    torch, core = host.torch, host.core
    from safetensors.torch import save_file

    targets = host.train_mod.find_targets(model, "all linear+conv")
    g = torch.Generator().manual_seed(seed)
    layers, lora = {}, {}
    for t in targets:
        layer = core.init_layer(t.weight_shape, rank, g, alpha=float(rank))
        s = torch.linspace(0.02, 0.01, layer.rank)  # descending, positive: canonical
        layer = core.TriLoRALayer(layer.u, s, layer.vt, layer.alpha)
        layers[t.prefix] = layer
        up = layer.u * s
        if len(t.weight_shape) > 2:
            up = up.reshape(*up.shape, *([1] * (len(t.weight_shape) - 2)))
        lora[f"{t.prefix}.lora_up.weight"] = up.contiguous()
        lora[f"{t.prefix}.lora_down.weight"] = layer.vt.contiguous()
        lora[f"{t.prefix}.alpha"] = torch.tensor(float(layer.alpha))
    tri_name, lora_name = f"bench_trilora_r{rank}.safetensors", f"bench_lora_r{rank}.safetensors"
    core.write_trilora(host.loras / tri_name, layers)
    save_file(lora, str(host.loras / lora_name))
    return tri_name, lora_name, len(targets)


def load_patch_cycle(host: Host, side: str, model, clip, name: str, cold: bool, state: dict) -> dict:
    host.settle()
    if side == "ours":
        if cold:
            host.file_cache._cache.clear()
        node = host.nodes.NODE_CLASS_MAPPINGS["TriLoRALoader"]
        t0, c0 = time.perf_counter(), time.process_time()
        out = node.execute(model=model, clip=clip, trilora_name=name, strength_model=1.0, strength_clip=1.0)
        patched = out.result[0] if hasattr(out, "result") else out[0]
    else:
        if cold or "lora_loader" not in state:
            state["lora_loader"] = host.nodes.LoraLoader()
        t0, c0 = time.perf_counter(), time.process_time()
        patched = state["lora_loader"].load_lora(model, clip, name, 1.0, 1.0)[0]
    t1 = time.perf_counter()
    host.mm.load_models_gpu([patched])
    t2 = time.perf_counter()
    host.mm.unload_all_models()
    t3, c3 = time.perf_counter(), time.process_time()
    del patched
    host.settle()
    return {"total_s": t3 - t0, "total_cpu_s": c3 - c0, "node_s": t1 - t0, "load_s": t2 - t1, "unload_s": t3 - t2}


def section_load(host: Host, cfg: dict, model, clip) -> dict:
    rank = cfg["rank"]
    tri, lora, n_layers = write_files(host, model, rank)
    out = {}
    for mode in ("cold", "warm"):
        state: dict = {}
        if mode == "warm":  # fill both caches first
            load_patch_cycle(host, "ours", model, clip, tri, False, state)
            load_patch_cycle(host, "theirs", model, clip, lora, True, state)
        runs = {"ours": [], "theirs": []}
        for r in range(cfg["load_rounds"]):
            for side in (("ours", "theirs") if r % 2 == 0 else ("theirs", "ours")):
                runs[side].append(load_patch_cycle(host, side, model, clip, tri if side == "ours" else lora,
                                                   mode == "cold", state))
        total = {k: [x["total_s"] for x in v] for k, v in runs.items()}
        cpu = {k: [x["total_cpu_s"] for x in v] for k, v in runs.items()}
        summary = ratio_summary(total["ours"], total["theirs"], cpu["ours"], cpu["theirs"])
        for part in ("node_s", "load_s", "unload_s"):
            summary[f"{part}_ours_median"] = median([x[part] for x in runs["ours"]])
            summary[f"{part}_theirs_median"] = median([x[part] for x in runs["theirs"]])
        summary.update(unit="s/cycle", setting={"rank": rank, "layers": n_layers, "file": mode}, raw=runs)
        out[f"load_patch_{mode}"] = summary
        say(f"  load+patch {mode}: ours {summary['ours_median']:.3f}s, theirs {summary['theirs_median']:.3f}s, "
            f"ratio {summary['ratio_median']:.3f} (cpu time {summary['cpu']['ratio_median']:.3f})")
    return out


# ---------------------------------------------------------------- section 5


def section_scaling(host: Host, cfg: dict, model, clip) -> dict:
    dtype = training_dtype(host.device)
    out = {"step_vs_rank": [], "step_vs_latent": [], "overhead_vs_latent": [], "patch_vs_rank": []}
    points = [("step_vs_rank", rank, cfg["latent"]) for rank in cfg["scale_ranks"]]
    points += [(kind, cfg["rank"], size) for kind in ("step_vs_latent", "overhead_vs_latent")
               for size in cfg["scale_latents"]]
    for kind, rank, size in points:
        latents, positive = host.data(size)
        res = {"ours": [], "theirs": []}  # for overhead_vs_latent "theirs" is the no-adapter run
        other = functools.partial(host.run_ours, only_first=True) if kind == "overhead_vs_latent" else host.run_theirs
        for p in range(cfg["scale_pairs"]):
            for side in (("ours", "theirs") if p % 2 == 0 else ("theirs", "ours")):
                fn = host.run_ours if side == "ours" else other
                res[side].append(fn(model, latents, positive, cfg["scale_steps"], rank, dtype, False))
        row = {**ratio_summary(*([x[key] for x in res[side]] for key in ("step_s",) for side in ("ours", "theirs")),
                               *([x["step_cpu_s"] for x in res[side]] for side in ("ours", "theirs"))),
               "rank": rank, "latent": size, "unit": "s/step"}
        out[kind].append(row)
        say(f"  {kind} rank {rank} latent {size}: ours {row['ours_median']:.3f}s theirs {row['theirs_median']:.3f}s "
            f"ratio {row['ratio_median']:.3f} (cpu time {row['cpu']['ratio_median']:.3f})")
    for rank in cfg["patch_ranks"]:
        tri, lora, n_layers = write_files(host, model, rank)
        runs = {"ours": [], "theirs": []}
        state: dict = {}
        for p in range(cfg["patch_pairs"]):
            for side in (("ours", "theirs") if p % 2 == 0 else ("theirs", "ours")):
                runs[side].append(load_patch_cycle(host, side, model, clip, tri if side == "ours" else lora, True,
                                                   state))
        wall = {k: [x["total_s"] for x in v] for k, v in runs.items()}
        cpu = {k: [x["total_cpu_s"] for x in v] for k, v in runs.items()}
        row = {**ratio_summary(wall["ours"], wall["theirs"], cpu["ours"], cpu["theirs"]), "rank": rank,
               "layers": n_layers, "unit": "s/cycle"}
        out["patch_vs_rank"].append(row)
        say(f"  patch rank {rank}: ours {row['ours_median']:.3f}s theirs {row['theirs_median']:.3f}s "
            f"ratio {row['ratio_median']:.3f} (cpu time {row['cpu']['ratio_median']:.3f})")
    return out


# ---------------------------------------------------------------- section 6: full size


def section_fullsize(host: Host, cfg: dict) -> dict:
    """Full-width models (ComfyUI's configs, random weights), as the executor runs the nodes:
    TrainTriLoRA vs TrainLoraNode, checkpointing on and off; ours under inference mode vs not;
    then how cost grows with rank and latent size (first model of the list)."""
    torch = host.torch
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}
    out = {"models": [], "scaling": []}
    rank, steps = cfg["fs_rank"], cfg["fs_steps"]
    models = cfg["fs_models_cuda"] if host.device == "cuda" else cfg["fs_models"]
    for n, (family, weight_dtype, latent) in enumerate(models):
        t0 = time.perf_counter()
        if family == "tiny":  # the same code path on the tiny checkpoint (smoke runs, --dry-run)
            mp = host.load_tiny()[0]
            n_params = sum(p.numel() for p in mp.model.diffusion_model.parameters())
        else:
            mp, n_params = full_size_model(host, family, dtypes[weight_dtype])
        train_dtype = "fp32" if weight_dtype == "fp32" else "bf16"
        latents, positive = family_data(host, family, latent)
        entry = {"family": family, "weights": weight_dtype, "dtype": train_dtype, "params": n_params,
                 "latent": latent, "rank": rank, "steps": steps, "analytic_adapter_bytes":
                 analytic_adapter_bytes(host, mp, rank), "build_s": time.perf_counter() - t0, "rows": []}
        say(f"  {family} ({n_params / 1e6:.0f}M parameters, {weight_dtype} weights, {train_dtype} training, "
            f"latent {latent}x{latent}) built in {entry['build_s']:.0f} s")
        run = functools.partial(measured_run, host, mp=mp, steps=steps, dtype=train_dtype)
        entry["rows"] = _checkpointing_rows(run, cfg, latents, positive, rank)
        if cfg["fs_executor_pairs"]:
            entry["executor"] = _executor_row(host, run, cfg, mp, latents, positive, rank)
        if n == 0 and (cfg["fs_scale_ranks"] or cfg["fs_scale_latents"]):
            out["scaling"] += _scaling_rows(host, run, cfg, mp, family, weight_dtype, latent, rank)
        out["models"].append(entry)
        del mp, run
        host.settle()
        malloc_trim()
    return out


def _checkpointing_rows(run, cfg: dict, latents, positive, rank: int) -> list[dict]:
    """TrainTriLoRA against TrainLoraNode with checkpointing on and off."""
    rows = []
    for checkpointing in cfg["fs_checkpointing"] if cfg["fs_pairs"] else []:
        runs = {"ours": [], "theirs": []}
        for order in pairs(cfg["fs_pairs"]):
            for side in order:
                runs[side].append(run(side=side, latents=latents, positive=positive, rank=rank,
                                      checkpointing=checkpointing))
                r = runs[side][-1]
                say(f"    checkpointing {'on' if checkpointing else 'off'} {side}: step {r['step_s']:.2f} s "
                    f"(cpu {r['step_cpu_s']:.2f} s), peak {r['peak_bytes'] / 2**20:.0f} MiB, adapter "
                    f"{(r['adapter_bytes'] or 0) / 2**20:.1f} MiB")
        rows.append({"checkpointing": checkpointing, **compare(runs, {"checkpointing": checkpointing})})
    return rows


def _executor_row(host: Host, run, cfg: dict, mp, latents, positive, rank: int) -> dict:
    """Ours as the executor runs it against ours on plain weights outside inference mode (same storage)."""
    ck = cfg["fs_checkpointing"][0]
    runs = {"ours": [], "theirs": []}  # "theirs" here: ours outside inference mode
    for order in pairs(cfg["fs_executor_pairs"]):
        for side in order:
            with plain_weights(host, mp) if side == "theirs" else contextlib.nullcontext():
                runs[side].append(run(side="ours", latents=latents, positive=positive, rank=rank,
                                      checkpointing=ck, executor=side == "ours"))
    row = {"checkpointing": ck, **compare(runs, {"checkpointing": ck})}
    say(f"    executor / plain step {row['step']['cpu']['ratio_median']:.3f} (cpu time), "
        f"memory {row['memory']['ratio_median']:.3f}")
    return row


def _scaling_rows(host: Host, run, cfg: dict, mp, family: str, weight_dtype: str, latent: int,
                  rank: int) -> list[dict]:
    """How step time and memory grow with the rank and the latent size."""
    ck = cfg["fs_checkpointing"][0]
    points = [(r, latent) for r in cfg["fs_scale_ranks"]] + [(rank, s) for s in cfg["fs_scale_latents"]]
    rows = []
    for r, size in points:
        lat, pos = family_data(host, family, size)
        runs = {"ours": [], "theirs": []}
        for order in pairs(cfg["fs_scale_pairs"]):
            for side in order if cfg["fs_scale_theirs"] else ("ours",):
                runs[side].append(run(side=side, latents=lat, positive=pos, rank=r, checkpointing=ck))
        if not runs["theirs"]:
            runs["theirs"] = [{k: None for k in runs["ours"][0]} for _ in runs["ours"]]
        row = {"rank": r, "latent": size, "checkpointing": ck, **compare(runs, {"rank": r, "latent": size}),
               "analytic_adapter_bytes": analytic_adapter_bytes(host, mp, r)}
        rows.append({"family": family, "weights": weight_dtype, **row})
        ours = row["raw"]["ours"][-1]
        say(f"    rank {r} latent {size}: ours peak {ours['peak_bytes'] / 2**20:.0f} MiB, step "
            f"{ours['step_s']:.2f} s (cpu {ours['step_cpu_s']:.2f} s), adapter "
            f"{ours['adapter_bytes'] / 2**20:.0f} MiB")
    return rows


@contextlib.contextmanager
def plain_weights(host: Host, mp):
    """The model's inference-tensor weights swapped for plain tensors on the same memory, as if
    it had been loaded outside inference mode; swapped back on exit."""
    torch, saved = host.torch, []
    with torch.inference_mode(False):
        for module in mp.model.modules():
            for name, p in list(module._parameters.items()):
                if p is not None and p.is_inference():
                    saved.append((module, name, p))
                    module._parameters[name] = torch.nn.Parameter(host.train_mod.trainable_alias(p),
                                                                  requires_grad=False)
    try:
        yield
    finally:
        for module, name, p in saved:
            module._parameters[name] = p


# ---------------------------------------------------------------- section 4 (one side per process)


def worker_memory(host: Host, cfg: dict, side: str) -> dict:
    torch = host.torch
    model, _ = host.load_tiny()
    latents, positive = host.data(cfg["latent"])
    dtype, rank, steps = training_dtype(host.device), cfg["rank"], cfg["mem_steps"]
    host.settle()
    host.mm.load_models_gpu([model])
    result = {"side": side, "device": host.device, "latent": cfg["latent"], "rank": rank, "steps": steps}
    if host.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        result["method"] = "cuda max_memory_allocated - memory_allocated after model load"
    else:
        gc.collect()
        reset = reset_peak_rss()
        before_kib = status_kib("VmRSS") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result["method"] = ("VmHWM after a reset (clear_refs 5) - VmRSS after model load" if reset
                            else "ru_maxrss - ru_maxrss after model load")
    # The node's own model load happens inside the node (on the clone of an already loaded model).
    fn = host.run_ours if side == "ours" else host.run_theirs
    t0 = time.perf_counter()
    fn(model, latents, positive, steps, rank, dtype, False)
    result["total_s"] = time.perf_counter() - t0
    if host.device == "cuda":
        result["peak_bytes"] = torch.cuda.max_memory_allocated() - before
    else:
        peak_kib = status_kib("VmHWM") if result["method"].startswith("VmHWM") else \
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result["peak_bytes"] = (peak_kib - before_kib) * 1024
        result["rss_after_model_load_bytes"] = before_kib * 1024
    return result


def worker_timing(host: Host, cfg: dict, sections: list[str]) -> dict:
    out: dict = {}
    t0 = time.perf_counter()
    if {"train", "load", "scaling"} & set(sections):
        model, clip = host.load_tiny(clip=cfg.get("clip", True) and bool({"load", "scaling"} & set(sections)))
        if "train" in sections:
            say(f"[{host.device}] 1-2. training step and adapter overhead")
            out["train"] = section_train(host, cfg, model)
        if "load" in sections:
            say(f"[{host.device}] 3. load and patch")
            out["load"] = section_load(host, cfg, model, clip)
        if "scaling" in sections:
            say(f"[{host.device}] 5. scaling")
            out["scaling"] = section_scaling(host, cfg, model, clip)
        del model, clip
        host.settle()
    if "fullsize" in sections:
        say(f"[{host.device}] 6. full size")
        out["fullsize"] = section_fullsize(host, cfg)
    if "bases" in sections:
        say(f"[{host.device}] 7. quantized and offloaded bases")
        out["bases"] = bench_bases.section_bases(host, cfg, say)
    if "data" in sections:
        say(f"[{host.device}] 8. training data: dataset cache, text encoders")
        out["data"] = bench_data.section_data(host, cfg, say)
    out["elapsed_s"] = time.perf_counter() - t0
    return out


# =========================================================================== orchestrator


def spawn(args: list[str], result: Path, timeout: float, threads: int = 0) -> dict:
    """Runs a worker; its [bench] lines are shown as they come, the rest kept for an error."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *args, "--result", str(result)]
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    with subprocess.Popen(cmd, cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          bufsize=1, env=env) as proc:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith("[bench]"):
                print(line, end="", flush=True)
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"worker {' '.join(args)} ran past {timeout:.0f} s")
        code = proc.wait()
    if code != 0 or not result.exists():
        tail = "\n".join(lines[-40:])
        raise RuntimeError(f"worker {' '.join(args)} failed (exit {code}):\n{tail}")
    return json.loads(result.read_text())


def goal_text(name: str, value) -> str:
    if name not in GOALS or value is None:
        return ""
    goal, stretch = GOALS[name]
    if name == "full_adapter":
        return f"within 10%: {'met' if abs(value - 1) <= 0.1 else 'MISSED'}"
    verdict = "met" if value <= goal else "MISSED"
    if stretch is not None and value <= stretch:
        verdict += f", stretch <= {stretch} met"
    return f"<= {goal}: {verdict}"


def summary_rows(results: dict) -> list[dict]:  # noqa: C901 - one branch per measured section, each a flat list of rows
    """One row per figure. Times are judged on CPU time where the CPU runs were single-threaded
    (process time then counts this process's work only, not the time other processes on a shared
    machine take from it); else, and on CUDA, on wall time. Both ratios are kept."""
    rows = []
    single = results["config"].get("threads") == 1

    def add(device, name, label, s, unit_scale=1.0, unit="s"):
        basis = "cpu" if "cpu" in s and device == "cpu" and single else "wall"
        b = s["cpu"] if basis == "cpu" else s
        rows.append({
            "device": device, "name": name, "what": label, "basis": basis if unit == "s" else "peak",
            "ratio": b.get("ratio_median"), "ratio_range": [b.get("ratio_min"), b.get("ratio_max")],
            "ratio_wall": s.get("ratio_median"), "ratio_cpu": s.get("cpu", {}).get("ratio_median"),
            "pairs": b.get("pairs"),
            "ours": None if b.get("ours_median") is None else b["ours_median"] * unit_scale,
            "theirs": None if b.get("theirs_median") is None else b["theirs_median"] * unit_scale,
            "unit": unit, "goal": goal_text(name, b.get("ratio_median")),
        })

    for device, res in results["devices"].items():
        timing = res.get("timing", {})
        if "train" in timing:
            t = timing["train"]
            st = t["train_step"]["setting"]
            where = f"rank {st['rank']}, latent {st['latent']}x{st['latent']}, {st['dtype']}"
            add(device, "train_step", f"1. training step, TrainTriLoRA / TrainLoraNode ({where})", t["train_step"])
            add(device, "adapter_overhead", "2. adapter overhead, TrainTriLoRA step / no-adapter step",
                t["adapter_overhead"])
            add(device, "theirs_overhead", "2'. (context) TrainLoraNode step / no-adapter step", t["theirs_overhead"])
            add(device, "node_total", f"(context) whole node run, {st['steps']} steps incl. setup", t["node_total"])
        if "load" in timing:
            for mode in ("cold", "warm"):
                s = timing["load"][f"load_patch_{mode}"]
                add(device, f"load_patch_{mode}", f"3. load+patch+unload, TriLoRALoader / LoraLoader, file {mode} "
                    f"(rank {s['setting']['rank']}, {s['setting']['layers']} layers)", s)
        if "memory" in res:
            m = res["memory"]
            add(device, "train_memory", f"4. training memory over the loaded model ({m['method']})", m,
                unit_scale=1 / 2**20, unit="MiB")
        if "scaling" in timing:
            sc = timing["scaling"]
            for row in sc["step_vs_rank"]:
                add(device, "step_vs_rank", f"5. training step, rank {row['rank']} (latent {row['latent']})", row)
            for row in sc["step_vs_latent"]:
                add(device, "step_vs_latent", f"5. training step, latent {row['latent']}x{row['latent']} "
                    f"(rank {row['rank']})", row)
            for row in sc.get("overhead_vs_latent", []):
                add(device, "overhead_vs_latent", f"5. adapter overhead, latent {row['latent']}x{row['latent']} "
                    f"(rank {row['rank']}): TrainTriLoRA / no adapter", row)
            for row in sc["patch_vs_rank"]:
                add(device, "patch_vs_rank", f"5. load+patch+unload (cold), rank {row['rank']}", row)
        if "fullsize" in res:
            fullsize_rows(res["fullsize"]["fullsize"], functools.partial(add, device))
        if "bases" in timing:
            bench_bases.summary(timing["bases"], functools.partial(add, device))
        if "data" in timing:
            bench_data.summary(timing["data"], functools.partial(add, device))
    return rows


def fullsize_rows(fs: dict, add) -> None:
    """Section 6's rows: per model, step and peak memory per checkpointing setting, adapter memory
    against its analytic size, ours under inference mode against plain weights; then scaling."""
    mib = {"unit_scale": 1 / 2**20, "unit": "MiB"}
    for m in fs["models"]:
        what = f"6. {m['family']} ({m['params'] / 1e6:.0f}M, {m['weights']} weights, {m['dtype']}), latent " \
               f"{m['latent']}, rank {m['rank']}"
        for row in m["rows"]:
            ck = "on" if row["checkpointing"] else "off"
            add("full_step", f"{what}, checkpointing {ck}: step", row["step"])
            add("full_memory", f"{what}, checkpointing {ck}: peak memory over the loaded model", row["memory"], **mib)
        measured = median(r["adapter_bytes"] for row in m["rows"] for r in row["raw"]["ours"])
        theirs = median(r["adapter_bytes"] for row in m["rows"] for r in row["raw"]["theirs"])
        if measured is not None:
            add("full_adapter", f"{what}: adapter memory (factors+grads+AdamW state), measured / analytic; "
                f"theirs: {fmt(theirs and theirs / 2**20, 1)} MiB",
                {"ratio_median": measured / m["analytic_adapter_bytes"], "ours_median": measured,
                 "theirs_median": m["analytic_adapter_bytes"], "pairs": 1}, **mib)
        if "executor" in m:
            e = m["executor"]
            add("executor_step", f"{what}: TrainTriLoRA step under the executor's inference mode / outside it "
                f"(checkpointing {'on' if e['checkpointing'] else 'off'})", e["step"])
            add("executor_memory", f"{what}: TrainTriLoRA peak memory under inference mode / outside it",
                e["memory"], **mib)
    for row in fs["scaling"]:
        what = f"6. {row['family']} scaling: rank {row['rank']}, latent {row['latent']}"
        add("full_scale_step", f"{what}: step", row["step"])
        add("full_scale_memory", f"{what}: peak memory", row["memory"], **mib)


def table(rows: list[dict]) -> str:
    lines = ["| device | figure | ratio ours/theirs, median | range | pairs | basis | wall-time ratio | ours | "
             "theirs | goal |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r["ratio_range"]
        digits = 1 if r["unit"] == "MiB" else 3
        lines.append(f"| {r['device']} | {r['what']} | **{fmt(r['ratio'])}** | {fmt(lo)}-{fmt(hi)} | {r['pairs']} | "
                     f"{r['basis']} | {fmt(r['ratio_wall']) if r['basis'] == 'cpu' else ''} | "
                     f"{fmt(r['ours'], digits)} {r['unit']} | {fmt(r['theirs'], digits)} {r['unit']} | {r['goal']} |")
    return "\n".join(lines)


def orchestrate(opts) -> int:
    import torch

    cfg = dict(QUICK if opts.quick else FULL)
    if opts.rounds:
        cfg["rounds"] = opts.rounds
    for item in opts.set:
        key, _, value = item.partition("=")
        if key not in cfg:
            raise SystemExit(f"--set {item}: unknown setting {key!r}; known: {', '.join(sorted(cfg))}")
        cfg[key] = json.loads(value)
    cfg["threads"] = opts.threads
    sections = opts.sections.split(",")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() and not opts.cpu_only else [])
    out_dir = Path(opts.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    started = _dt.datetime.now().astimezone()
    results = {"schema": SCHEMA_VERSION, "quick": opts.quick, "started": started.isoformat(timespec="seconds"),
               "command": " ".join([Path(sys.executable).name, "scripts/bench.py", *sys.argv[1:]]),
               "machine": machine_info(), "config": cfg, "sections": sections, "devices": {}}
    say(f"{'quick' if opts.quick else 'full'} run on {', '.join(devices)}, CPU threads "
        f"{opts.threads or 'torch default'}; load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="trilora-bench-") as tmp:
        for device in devices:
            dev: dict = {}
            dev_sections = [s for s in sections if s not in ("memory", "fullsize")]
            if dev_sections:
                dev["timing"] = spawn(["--worker", "timing", "--device", device, "--config", json.dumps(cfg),
                                       "--sections", ",".join(dev_sections)], Path(tmp) / f"timing-{device}.json",
                                      opts.timeout, cfg["threads"] if device == "cpu" else 0)
            if "memory" in sections:
                say(f"[{device}] 4. training memory (one subprocess per run)")
                runs = {"ours": [], "theirs": []}
                for p in range(cfg["mem_pairs"]):
                    for side in (("ours", "theirs") if p % 2 == 0 else ("theirs", "ours")):
                        res = spawn(["--worker", "memory", "--device", device, "--side", side, "--config",
                                     json.dumps(cfg)], Path(tmp) / f"mem-{device}-{side}-{p}.json", opts.timeout,
                                    cfg["threads"] if device == "cpu" else 0)
                        runs[side].append(res)
                        say(f"  {side}: {res['peak_bytes'] / 2**20:.1f} MiB over the loaded model")
                mem = ratio_summary([r["peak_bytes"] for r in runs["ours"]], [r["peak_bytes"] for r in runs["theirs"]])
                mem.update(unit="bytes", method=runs["ours"][0]["method"], raw=runs)
                dev["memory"] = mem
            if "fullsize" in sections:  # its own process: the big models' memory is gone after it
                dev["fullsize"] = spawn(["--worker", "timing", "--device", device, "--config", json.dumps(cfg),
                                         "--sections", "fullsize"], Path(tmp) / f"fullsize-{device}.json",
                                        opts.fullsize_timeout, cfg["threads"] if device == "cpu" else 0)
            results["devices"][device] = dev
    results["elapsed_s"] = time.perf_counter() - t0
    results["machine"]["loadavg_end"] = os.getloadavg()
    results["summary"] = summary_rows(results)
    stamp = started.strftime("%Y%m%d-%H%M%S")
    raw = out_dir / f"bench-{stamp}{'-quick' if opts.quick else ''}.json"
    text = json.dumps(results, indent=1, default=str)
    raw.write_text(text)
    (out_dir / ("latest-quick.json" if opts.quick else "latest.json")).write_text(text)
    md = (f"Run {results['started']}, {results['command']}, {results['elapsed_s']:.0f} s; "
          f"{results['machine']['cpu']}, {results['machine']['cores']} cores, torch {results['machine']['torch']}, "
          f"CPU threads {opts.threads or 'torch default'}; "
          f"load average {results['machine']['loadavg_start'][0]:.1f} at start, "
          f"{results['machine']['loadavg_end'][0]:.1f} at end.\n\n{table(results['summary'])}\n")
    (out_dir / ("latest-quick.md" if opts.quick else "latest.md")).write_text(md)
    print()
    print(md)
    say(f"raw results: {raw}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, one round (< 60 s)")
    parser.add_argument("--out", default=str(REPO / "bench_output"), help="folder for the results")
    parser.add_argument("--sections", default="train,load,memory,scaling,fullsize,bases,data",
                        help="comma-separated subset of train,load,memory,scaling,fullsize,bases,data")
    parser.add_argument("--rounds", type=int, default=0, help="override the rounds of sections 1-2")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads in the workers (default 1: on a shared machine a single thread's "
                             "process time is the robust measure; 0 = torch's default, judged on wall time)")
    parser.add_argument("--cpu-only", action="store_true", help="skip the GPU even when there is one")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                        help="override one setting of the run, e.g. --set 'fs_models=[[\"SD15\",\"fp32\",16]]' "
                             "or --set fs_pairs=1 (keys: the FULL dict at the top of this script)")
    parser.add_argument("--fullsize-timeout", type=float, default=7200, help="seconds for the full-size worker")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per worker process")
    # internal: worker processes
    parser.add_argument("--worker", choices=["timing", "memory"], help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--side", choices=["ours", "theirs"], help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.worker is None:
        return orchestrate(opts)
    cfg = json.loads(opts.config)
    host = Host(opts.device, cfg.get("threads", 0) if opts.device == "cpu" else 0)
    if opts.worker == "timing":
        res = worker_timing(host, cfg, opts.sections.split(","))
    else:
        res = worker_memory(host, cfg, opts.side)
    Path(opts.result).write_text(json.dumps(res, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
