"""What the benchmark scripts share (scripts/bench.py, bench_gpu.py, bench_method.py): the
measuring host (the real ComfyUI in process, both trainers run as the executor runs them, step
times from ComfyUI's progress hook), full-size models from ComfyUI's own configs with random
weights, measured runs (step times, peak memory, the adapter's memory), paired comparisons and
the machine's description. What each figure means: BENCHMARKS.md and scripts/bench.py.
"""
from __future__ import annotations

import contextlib
import gc
import math
import os
import platform
import resource
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from . import COMFY, REPO, TINY
from .host import as_loader_made, boot, pack_module, start


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


def fmt(value, digits=3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


# --------------------------------------------------------------- the host


class BenchHost:
    """The real ComfyUI in this process (CPU unless the device is cuda), with the pack loaded by
    ComfyUI's own custom-node loader (harness.host), saving into a temporary loras folder; it runs
    TrainTriLoRA (``run_ours``) and ComfyUI's TrainLoraNode (``run_theirs``) as the executor does and
    times each optimizer step through ComfyUI's global progress hook."""

    def __init__(self, device: str, threads: int = 0):
        start(device)
        import logging

        import comfy.sd
        import comfy.utils
        import torch

        logging.getLogger().setLevel(logging.ERROR)
        if threads:
            torch.set_num_threads(threads)
        self.tmp = tempfile.TemporaryDirectory(prefix="trilora-bench-")
        loras = Path(self.tmp.name) / "loras"
        loras.mkdir()
        booted = boot(loras, Path(self.tmp.name) / "output", device)
        if not booted.loaded_ok:
            raise SystemExit(f"the pack did not load from {booted.pack_dir}")
        comfy.utils.PROGRESS_BAR_ENABLED = False  # TrainLoraNode's tqdm bar
        self.torch, self.nodes, self.mm, self.utils = torch, booted.nodes, booted.mm, comfy.utils
        self.sd, self.folder_paths = comfy.sd, booted.folder_paths
        self.train_mod = pack_module(booted, "nodes.training")
        self.file_cache = pack_module(booted, "nodes.file_cache")
        self.core = booted.core
        self.device = device
        self.loras = loras
        self.stamps: list[tuple[float, float]] = []  # (wall, process CPU time) at each progress update
        comfy.utils.set_progress_bar_global_hook(
            lambda *a, **k: self.stamps.append((time.perf_counter(), time.process_time())))
        self.ours = self.nodes.NODE_CLASS_MAPPINGS["TrainTriLoRA"]
        self.theirs = self.nodes.NODE_CLASS_MAPPINGS["TrainLoraNode"]

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

    def ours_inputs(self, model, latents, positive, steps, rank, dtype, checkpointing) -> dict:
        """TrainTriLoRA's inputs for a run, as the executor passes them (lists: the node takes lists)."""
        return dict(model=[model], latents=latents, positive=[positive], steps=[steps], rank=[rank],
                    learning_rate=[1e-4], seed=[0], alpha=[float(rank)], batch_size=[1],
                    training_dtype=[dtype], gradient_checkpointing=[checkpointing],
                    optimizer=["AdamW"], loss_function=["MSE"], target_layers=["all linear+conv"])

    def run_ours(self, model, latents, positive, steps, rank, dtype, checkpointing, settle: bool = True) -> dict:
        kwargs = self.ours_inputs(model, latents, positive, steps, rank, dtype, checkpointing)
        return self._timed(lambda: self.ours.execute(**kwargs), settle)

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


# --------------------------------------------------------------- full-size models


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


def full_size_model(host: BenchHost, family: str, dtype, seed: int = 0, inference: bool = True):
    """(ModelPatcher, diffusion-model parameter count): a full-size ``family`` model with random
    weights, built as ComfyUI builds a detected checkpoint's model (its model config, its
    operations, weights in ``dtype``) and under torch.inference_mode, as the executor runs the
    checkpoint loader (so the weights are inference tensors, as in users' graphs). Like a
    loader's, the ModelPatcher can build itself again (harness.host.as_loader_made)."""
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
    with torch.inference_mode(inference):
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
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=load_device,
                                               offload_device=host.mm.unet_offload_device())
    again = lambda: full_size_model(host, family, dtype, seed, torch.is_inference_mode_enabled())[0]  # noqa: E731
    return as_loader_made(patcher, again), n_params


def family_data(host: BenchHost, family: str, latent: int, seed: int = 0):
    """Two latents and one random conditioning shaped like ``family``'s text encoders' output."""
    torch = host.torch
    channels, tokens, width, pooled = FAMILY_DATA[family]
    g = torch.Generator().manual_seed(seed)
    latents = [{"samples": torch.randn(1, channels, latent, latent, generator=g)} for _ in range(2)]
    extra = {} if pooled is None else {"pooled_output": torch.randn(1, pooled, generator=g)}
    if family == "Flux":
        extra["guidance"] = 3.5
    return latents, [[torch.randn(1, tokens, width, generator=g), extra]]


def malloc_trim() -> None:
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


def analytic_adapter_bytes(host: BenchHost, mp, rank: int) -> int:
    """TriLoRA's training memory by its shapes: per adapted layer k (out + 1 + in) fp32 numbers
    (k = min(rank, out, in)), times 4: the factors, their gradients and AdamW's two moments."""
    numel = 0
    for t in host.train_mod.find_targets(mp, "all linear+conv"):
        out, inner = t.weight_shape[0], math.prod(t.weight_shape[1:])
        numel += min(rank, out, inner) * (out + 1 + inner)
    return numel * 4 * 4


def measured_run(host: BenchHost, side: str, mp, latents, positive, steps, rank, dtype, checkpointing,
                 executor: bool = True) -> dict:
    """One training run of ``side`` with its step times, peak memory over the loaded model and
    adapter memory. ``executor``: under torch.inference_mode, as ComfyUI's executor runs nodes."""
    torch = host.torch
    cuda = host.device == "cuda"
    host.settle()
    malloc_trim()
    host.mm.load_models_gpu([mp])
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        reset = reset_peak_rss()
        before_kib = status_kib("VmRSS") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
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
        peak_kib = status_kib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        res["peak_bytes"] = (peak_kib - before_kib) * 1024
    res.update(adapter_bytes=adapter.bytes, adapter_numel=adapter.numel)
    host.settle()
    return res


def pairs(n: int):
    """A B, B A, A B ...: each side goes first equally often."""
    return [("ours", "theirs") if p % 2 == 0 else ("theirs", "ours") for p in range(n)]


def compare(runs: dict, setting: dict) -> dict:
    """Step time (wall and CPU time), peak memory and adapter memory, ours against theirs."""
    step = {k: [x["step_s"] for x in v] for k, v in runs.items()}
    cpu = {k: [x["step_cpu_s"] for x in v] for k, v in runs.items()}
    peak = {k: [x["peak_bytes"] for x in v] for k, v in runs.items()}
    adapter = {k: [x["adapter_bytes"] for x in v] for k, v in runs.items()}
    return {"setting": setting, "step": ratio_summary(step["ours"], step["theirs"], cpu["ours"], cpu["theirs"]),
            "memory": ratio_summary(peak["ours"], peak["theirs"]),
            "adapter_bytes": {k: median(v) for k, v in adapter.items()}, "raw": runs}


def status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Resets the kernel's peak-RSS mark (VmHWM) of this process; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def machine_info() -> dict:
    """The machine, torch and ComfyUI of a run, for the record beside its results."""
    import torch

    info = {
        "cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
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
