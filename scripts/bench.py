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
import asyncio
import contextlib
import datetime as _dt
import functools
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMFY = Path(os.environ.get("COMFYUI_DIR") or REPO / ".comfyui").resolve()
TINY = "trilora-tiny-sd15.safetensors"
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
}

QUICK = {
    **FULL,
    "latent": 8, "steps": 3, "rounds": 1, "load_rounds": 1, "mem_steps": 2, "mem_pairs": 1,
    "scale_ranks": [4], "scale_latents": [4], "scale_steps": 2, "scale_pairs": 1,
    "patch_ranks": [4], "patch_pairs": 1, "clip": False,
    "fs_models": [["tiny", "fp32", 8]], "fs_models_cuda": [["tiny", "bf16", 8]], "fs_rank": 4, "fs_steps": 2,
    "fs_pairs": 1, "fs_checkpointing": [True], "fs_executor_pairs": 1, "fs_scale_ranks": [8], "fs_scale_latents": [],
    "fs_scale_theirs": True,
}


def say(text: str) -> None:
    print(f"[bench] {text}", flush=True)


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ratio_summary(ours: list[float], theirs: list[float], ours_cpu=None, theirs_cpu=None) -> dict:
    """Per-pair ratios ours/theirs and their median; absolute medians as context. With CPU times
    (process time: single-threaded runs), their ratios too, under ``cpu``."""
    ratios = [a / b for a, b in zip(ours, theirs, strict=True) if a is not None and b]
    extra = {"cpu": ratio_summary(ours_cpu, theirs_cpu)} if ours_cpu is not None else {}
    return {
        **extra,
        "ratio_median": median(ratios),
        "ratio_min": min(ratios) if ratios else None,
        "ratio_max": max(ratios) if ratios else None,
        "ratios": ratios,
        "ours_median": median(ours),
        "theirs_median": median(theirs),
        "ours": ours,
        "theirs": theirs,
        "pairs": len(ratios),
    }


# =========================================================================== worker side: ComfyUI


class Host:
    """The real ComfyUI in this process (CPU unless the device is cuda), with the pack loaded by
    ComfyUI's own custom-node loader, as tests/comfy/conftest.py does."""

    def __init__(self, device: str, threads: int = 0):
        sys.path.insert(0, str(COMFY))
        sys.argv = [sys.argv[0]] + (["--cpu"] if device == "cpu" else [])
        import comfy.options

        comfy.options.enable_args_parsing()
        import logging

        import comfy.model_management
        import comfy.sd
        import comfy.utils
        import folder_paths
        import torch

        import nodes

        logging.getLogger().setLevel(logging.ERROR)
        if threads:
            torch.set_num_threads(threads)
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
        pack_dir = COMFY / "custom_nodes" / "comfyui-trilora"
        if not asyncio.run(nodes.load_custom_node(str(pack_dir))):
            raise SystemExit(f"the pack did not load from {pack_dir}")
        pack = next(m for m in list(sys.modules.values())
                    if getattr(m, "__file__", None) == str(pack_dir / "__init__.py"))
        comfy.utils.PROGRESS_BAR_ENABLED = False  # TrainLoraNode's tqdm bar
        self.torch, self.nodes, self.mm, self.utils = torch, nodes, comfy.model_management, comfy.utils
        self.sd, self.folder_paths = comfy.sd, folder_paths
        self.train_mod = sys.modules[pack.__name__ + ".nodes.train"]
        self.file_cache = sys.modules[pack.__name__ + ".nodes.file_cache"]
        self.core = sys.modules[pack.__name__ + ".trilora_core"]
        self.device = device
        self.tmp = tempfile.TemporaryDirectory(prefix="trilora-bench-")
        loras = Path(self.tmp.name) / "loras"
        loras.mkdir()
        self.loras = loras
        folder_paths.add_model_folder_path("loras", str(loras), is_default=True)
        folder_paths.set_output_directory(str(Path(self.tmp.name) / "output"))
        self.stamps: list[tuple[float, float]] = []  # (wall, process CPU time) at each progress update
        comfy.utils.set_progress_bar_global_hook(
            lambda *a, **k: self.stamps.append((time.perf_counter(), time.process_time())))
        self.ours = nodes.NODE_CLASS_MAPPINGS["TrainTriLoRA"]
        self.theirs = nodes.NODE_CLASS_MAPPINGS["TrainLoraNode"]

    def load_tiny(self, clip: bool = False, dtype=None):
        """The tiny checkpoint, loaded under inference mode as the executor runs CheckpointLoaderSimple
        (``dtype``: the diffusion model's weight dtype, as UNETLoader's weight_dtype sets it)."""
        path = self.folder_paths.get_full_path_or_raise("checkpoints", TINY)
        with self.torch.inference_mode():
            out = self.sd.load_checkpoint_guess_config(path, output_vae=False, output_clip=clip,
                                                       embedding_directory=self.folder_paths.get_folder_paths("embeddings"),
                                                       model_options={} if dtype is None else {"dtype": dtype})
        return out[0], out[1]

    def data(self, latent: int, seed: int = 0):
        """Two latents of one size (TrainLoraNode 0.3.75 crashes on a single LATENT input), one
        random conditioning shaped like CLIP-L's (the UNet cannot tell it from an encoded prompt)."""
        g = self.torch.Generator().manual_seed(seed)
        latents = [{"samples": self.torch.randn(1, 4, latent, latent, generator=g)} for _ in range(2)]
        positive = [[self.torch.randn(1, 77, 768, generator=g), {}]]
        return latents, positive

    def settle(self) -> None:
        """Between runs, untimed: nothing loaded, garbage gone (both trainers leave their clone loaded)."""
        self.mm.unload_all_models()
        gc.collect()
        self.mm.soft_empty_cache()

    # ---- one training run per side; returns {"step_s": median step time, "steps": [...], "total_s"}

    def _timed(self, fn, settle: bool = True) -> dict:
        """Runs a node as ComfyUI's executor does (under torch.inference_mode unless the caller
        turned it off around this call); ``settle`` unloads everything before and after."""
        if settle:
            self.settle()
        self.stamps.clear()
        t0, c0 = time.perf_counter(), time.process_time()
        with self.torch.inference_mode(self.torch.is_inference_mode_enabled() or settle):
            fn()
        total, total_cpu = time.perf_counter() - t0, time.process_time() - c0
        wall = [b[0] - a[0] for a, b in zip(self.stamps, self.stamps[1:], strict=False)]
        cpu = [b[1] - a[1] for a, b in zip(self.stamps, self.stamps[1:], strict=False)]
        if settle:
            self.settle()
        return {"step_s": median(wall), "step_cpu_s": median(cpu), "steps": wall, "steps_cpu": cpu,
                "total_s": total, "total_cpu_s": total_cpu}

    def run_ours(self, model, latents, positive, steps, rank, dtype, checkpointing, only_first=False,
                 settle: bool = True) -> dict:
        kwargs = dict(model=[model], latents=latents, positive=[positive], steps=[steps], rank=[rank],
                      learning_rate=[1e-4], seed=[0], alpha=[float(rank)], batch_size=[1],
                      training_dtype=[dtype], gradient_checkpointing=[checkpointing],
                      optimizer=["AdamW"], loss_function=["MSE"], target_layers=["all linear+conv"])
        if not only_first:
            return self._timed(lambda: self.ours.execute(**kwargs), settle)
        # The no-adapter baseline: one tiny adapter on the first layer only (see the module doc).
        find = self.train_mod.find_targets

        def first_only(mp, target):
            found = [t for t in find(mp, target) if t.name.endswith("input_blocks.0.0")]
            return found or find(mp, target)[:1]

        self.train_mod.find_targets = first_only
        try:
            return self._timed(lambda: self.ours.execute(**kwargs))
        finally:
            self.train_mod.find_targets = find

    def run_theirs(self, model, latents, positive, steps, rank, dtype, checkpointing, settle: bool = True) -> dict:
        # Keyword args only, from the schema's defaults (newer ComfyUI inserts inputs mid-list).
        kwargs = {}
        with contextlib.suppress(Exception):
            for inp in self.theirs.define_schema().inputs:
                if getattr(inp, "default", None) is not None:
                    kwargs[inp.id] = [inp.default]
        kwargs.update(model=[model], latents=latents, positive=[positive], batch_size=[1], steps=[steps],
                      grad_accumulation_steps=[1], learning_rate=[1e-4], rank=[rank], optimizer=["AdamW"],
                      loss_function=["MSE"], seed=[0], training_dtype=[dtype],
                      lora_dtype=["fp32"],  # our factors train in fp32: the same for theirs
                      algorithm=["LoRA"], gradient_checkpointing=[checkpointing], existing_lora=["[None]"])
        import inspect

        accepted = inspect.signature(self.theirs.execute).parameters
        kwargs = {k: v for k, v in kwargs.items() if k in accepted}
        return self._timed(lambda: self.theirs.execute(**kwargs), settle)


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


# ComfyUI's own SD1.5 / SDXL UNet configs are locals of unet_config_from_diffusers_unet (read from its
# source); Flux's comes from ComfyUI's checkpoint detection run on a skeleton of Flux-dev's keys.
UNET_CONFIG_NAMES = {"SD15": "SD15", "SDXL": "SDXL"}
FLUX_DEV_SHAPES = {"img_in.weight": (3072, 64), "txt_in.weight": (3072, 4096),
                   "vector_in.in_layer.weight": (3072, 768), "guidance_in.in_layer.weight": (3072, 256),
                   "double_blocks.0.img_attn.norm.key_norm.scale": (128,)}
# (latent channels, context tokens, context width, pooled width or None) of each family's conditioning.
FAMILY_DATA = {"tiny": (4, 77, 768, None), "SD15": (4, 77, 768, None), "SDXL": (4, 77, 2048, 1280), "Flux": (16, 256, 4096, 768)}


def comfy_unet_config(family: str) -> dict:
    """The diffusion model config ComfyUI itself uses for ``family`` (SD15, SDXL or Flux)."""
    import ast
    import inspect

    import comfy.model_detection as md

    if family == "Flux":
        skeleton = {k: _Shape(v) for k, v in FLUX_DEV_SHAPES.items()}
        skeleton.update({f"double_blocks.{i}.x": _Shape(()) for i in range(19)})
        skeleton.update({f"single_blocks.{i}.x": _Shape(()) for i in range(38)})
        return md.detect_unet_config(skeleton, "")
    tree = ast.parse(inspect.getsource(md.unet_config_from_diffusers_unet).lstrip())
    for node in ast.walk(tree):
        if (isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
                and node.targets[0].id == UNET_CONFIG_NAMES[family] and isinstance(node.value, ast.Dict)):
            return {ast.literal_eval(k): None if isinstance(v, ast.Name) else ast.literal_eval(v)
                    for k, v in zip(node.value.keys, node.value.values, strict=True)}
    raise RuntimeError(f"ComfyUI's {family} UNet config was not found in unet_config_from_diffusers_unet")


class _Shape:
    """A stand-in state-dict entry: ComfyUI's detection reads only .shape."""

    def __init__(self, shape):
        self.shape = shape


def full_size_model(host: Host, family: str, dtype, seed: int = 0):
    """(ModelPatcher, diffusion-model parameter count): a full-size ``family`` model with random
    weights, built as ComfyUI builds a detected checkpoint's model (its model config, its
    operations, weights in ``dtype``) and under torch.inference_mode, as the executor runs the
    checkpoint loader (so the weights are inference tensors, as in users' graphs)."""
    import comfy.model_detection
    import comfy.model_patcher

    torch = host.torch
    model_config = comfy.model_detection.model_config_from_unet_config(comfy_unet_config(family))
    if model_config is None or type(model_config).__name__ != family:
        raise RuntimeError(f"ComfyUI did not take the {family} config for {family} but {type(model_config).__name__}")
    compute = torch.bfloat16 if dtype not in (torch.float32, torch.bfloat16, torch.float16) else None
    model_config.set_inference_dtype(dtype, compute)  # fp8 weights compute in bf16 (manual cast)
    load_device = host.mm.get_torch_device()
    g = torch.Generator(device=load_device).manual_seed(seed)
    with torch.inference_mode():
        model = model_config.get_model({}, "", device=load_device)
        # ComfyUI's ops leave weights uninitialised: give every tensor a value, layer by layer
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                std = (1.0 / max(1, p[0].numel())) ** 0.5
                if p.dtype in (torch.float32, torch.bfloat16, torch.float16):
                    p.normal_(0.0, std, generator=g)
                else:
                    p.copy_(torch.randn(p.shape, generator=g, device=load_device, dtype=torch.bfloat16).mul_(std))
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)
    n_params = sum(p.numel() for p in model.diffusion_model.parameters())
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device,
                                            offload_device=host.mm.unet_offload_device()), n_params


def family_data(host: Host, family: str, latent: int, seed: int = 0):
    """Two latents and one random conditioning shaped like ``family``'s text encoders' output."""
    torch = host.torch
    channels, tokens, width, pooled = FAMILY_DATA[family]
    g = torch.Generator().manual_seed(seed)
    latents = [{"samples": torch.randn(1, channels, latent, latent, generator=g)} for _ in range(2)]
    extra = {} if pooled is None else {"pooled_output": torch.randn(1, pooled, generator=g)}
    if family == "Flux":
        extra["guidance"] = 3.5
    return latents, [[torch.randn(1, tokens, width, generator=g), extra]]


def _malloc_trim() -> None:
    """Gives freed heap back to the kernel, so each run's RSS starts from the same floor."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)


class AdapterMemory:
    """Bytes of every optimizer's parameters, their gradients and its state (distinct storages),
    seen after the first optimizer step of a run: the adapter's whole training memory."""

    def __init__(self, torch):
        self.torch, self.bytes, self.numel = torch, None, None
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.handle = register_optimizer_step_post_hook(self._hook)

    def _hook(self, optimizer, args, kwargs):
        if self.bytes is not None:
            return
        tensors = []
        for group in optimizer.param_groups:
            for p in group["params"]:
                tensors += [p, p.grad] + [v for v in optimizer.state.get(p, {}).values()
                                          if isinstance(v, self.torch.Tensor)]
        seen, total = set(), 0
        for t in tensors:
            if t is None:
                continue
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        self.bytes = total
        self.numel = sum(p.numel() for g in optimizer.param_groups for p in g["params"])

    def close(self) -> None:
        self.handle.remove()


def analytic_adapter_bytes(host: Host, mp, rank: int) -> int:
    """TriLoRA's training memory by its shapes: per adapted layer k (out + 1 + in) fp32 numbers
    (k = min(rank, out, in)), times 4: the factors, their gradients and AdamW's two moments."""
    numel = 0
    for t in host.train_mod.find_targets(mp, "all linear+conv"):
        out, inner = t.weight_shape[0], math.prod(t.weight_shape[1:])
        numel += min(rank, out, inner) * (out + 1 + inner)
    return numel * 4 * 4


def measured_run(host: Host, side: str, mp, latents, positive, steps, rank, dtype, checkpointing,
                 executor: bool = True) -> dict:
    """One training run of ``side`` with its step times, peak memory over the loaded model and
    adapter memory. ``executor``: under torch.inference_mode, as ComfyUI's executor runs nodes."""
    torch = host.torch
    cuda = host.device == "cuda"
    host.settle()
    _malloc_trim()
    host.mm.load_models_gpu([mp])
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        reset = _reset_peak_rss()
        before_kib = _status_kib("VmRSS") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    adapter = AdapterMemory(torch)
    fn = host.run_ours if side == "ours" else host.run_theirs
    try:
        with torch.inference_mode(executor):
            res = fn(mp, latents, positive, steps, rank, dtype, checkpointing, settle=False)
    finally:
        adapter.close()
    if cuda:
        res["peak_bytes"] = torch.cuda.max_memory_allocated() - before
    else:
        peak_kib = _status_kib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        res["peak_bytes"] = (peak_kib - before_kib) * 1024
    res.update(adapter_bytes=adapter.bytes, adapter_numel=adapter.numel)
    host.settle()
    return res


def _pairs(n: int):
    """A B, B A, A B ...: each side goes first equally often."""
    return [("ours", "theirs") if p % 2 == 0 else ("theirs", "ours") for p in range(n)]


def _compare(runs: dict, setting: dict) -> dict:
    """Step time (wall and CPU time), peak memory and adapter memory, ours against theirs."""
    step = {k: [x["step_s"] for x in v] for k, v in runs.items()}
    cpu = {k: [x["step_cpu_s"] for x in v] for k, v in runs.items()}
    peak = {k: [x["peak_bytes"] for x in v] for k, v in runs.items()}
    adapter = {k: [x["adapter_bytes"] for x in v] for k, v in runs.items()}
    return {"setting": setting, "step": ratio_summary(step["ours"], step["theirs"], cpu["ours"], cpu["theirs"]),
            "memory": ratio_summary(peak["ours"], peak["theirs"]),
            "adapter_bytes": {k: median(v) for k, v in adapter.items()}, "raw": runs}


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
        for checkpointing in cfg["fs_checkpointing"] if cfg["fs_pairs"] else []:
            runs = {"ours": [], "theirs": []}
            for order in _pairs(cfg["fs_pairs"]):
                for side in order:
                    runs[side].append(measured_run(host, side, mp, latents, positive, steps, rank, train_dtype,
                                                   checkpointing))
                    r = runs[side][-1]
                    say(f"    checkpointing {'on' if checkpointing else 'off'} {side}: step {r['step_s']:.2f} s "
                        f"(cpu {r['step_cpu_s']:.2f} s), peak {r['peak_bytes'] / 2**20:.0f} MiB, adapter "
                        f"{(r['adapter_bytes'] or 0) / 2**20:.1f} MiB")
            entry["rows"].append({"checkpointing": checkpointing, **_compare(runs, {"checkpointing": checkpointing})})
        if cfg["fs_executor_pairs"]:
            # Ours as the executor runs it vs on plain weights outside inference mode (same storage).
            ck = cfg["fs_checkpointing"][0]
            runs = {"ours": [], "theirs": []}  # "theirs" here: ours outside inference mode
            for order in _pairs(cfg["fs_executor_pairs"]):
                for side in order:
                    with plain_weights(host, mp) if side == "theirs" else contextlib.nullcontext():
                        runs[side].append(measured_run(host, "ours", mp, latents, positive, steps, rank, train_dtype,
                                                       ck, executor=side == "ours"))
            entry["executor"] = {"checkpointing": ck, **_compare(runs, {"checkpointing": ck})}
            say(f"    executor / plain step {entry['executor']['step']['cpu']['ratio_median']:.3f} (cpu time), "
                f"memory {entry['executor']['memory']['ratio_median']:.3f}")
        if n == 0 and (cfg["fs_scale_ranks"] or cfg["fs_scale_latents"]):
            ck = cfg["fs_checkpointing"][0]
            points = [(r, latent) for r in cfg["fs_scale_ranks"]] + [(rank, s) for s in cfg["fs_scale_latents"]]
            for r, size in points:
                lat, pos = family_data(host, family, size)
                runs = {"ours": [], "theirs": []}
                for order in _pairs(cfg["fs_scale_pairs"]):
                    for side in order if cfg["fs_scale_theirs"] else ("ours",):
                        runs[side].append(measured_run(host, side, mp, lat, pos, steps, r, train_dtype, ck))
                if not runs["theirs"]:
                    runs["theirs"] = [{k: None for k in runs["ours"][0]} for _ in runs["ours"]]
                row = {"rank": r, "latent": size, "checkpointing": ck, **_compare(runs, {"rank": r, "latent": size}),
                       "analytic_adapter_bytes": analytic_adapter_bytes(host, mp, r)}
                out["scaling"].append({"family": family, "weights": weight_dtype, **row})
                ours = row["raw"]["ours"][-1]
                say(f"    rank {r} latent {size}: ours peak {ours['peak_bytes'] / 2**20:.0f} MiB, step "
                    f"{ours['step_s']:.2f} s (cpu {ours['step_cpu_s']:.2f} s), adapter "
                    f"{ours['adapter_bytes'] / 2**20:.0f} MiB")
        out["models"].append(entry)
        del mp
        host.settle()
        _malloc_trim()
    return out


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


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Resets the kernel's peak-RSS mark (VmHWM) of this process; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


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
        reset = _reset_peak_rss()
        before_kib = _status_kib("VmRSS") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
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
        peak_kib = _status_kib("VmHWM") if result["method"].startswith("VmHWM") else \
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
    out["elapsed_s"] = time.perf_counter() - t0
    return out


# =========================================================================== orchestrator


def machine_info() -> dict:
    import torch

    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {
        "cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
        "torch_default_threads": torch.get_num_threads(),
        "python": platform.python_version(), "platform": platform.platform(),
        "loadavg_start": os.getloadavg(), "comfyui_dir": str(COMFY),
    }
    with contextlib.suppress(Exception):
        info["comfyui_version"] = (COMFY / "comfyui_version.py").read_text().split('"')[1]
    with contextlib.suppress(Exception):
        info["git_commit"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                            capture_output=True, text=True).stdout.strip()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


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


def fmt(value, digits=3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


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


def summary_rows(results: dict) -> list[dict]:
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
    parser.add_argument("--sections", default="train,load,memory,scaling,fullsize",
                        help="comma-separated subset of train,load,memory,scaling,fullsize")
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
