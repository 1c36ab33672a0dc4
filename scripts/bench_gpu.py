#!/usr/bin/env python
"""`make bench-gpu`: TrainTriLoRA against ComfyUI's TrainLoraNode at full size on one CUDA GPU,
and a short CUDA check pass. Built for one H100/H200-class GPU, under 8 minutes.

Rows (ComfyUI's own model configs, random weights built under torch.inference_mode as the
executor loads checkpoints; both nodes run under inference mode as the executor runs them;
bf16 training, gradient checkpointing on, rank 16, the first step left out of the step time):

    SD1.5 at 512 px, SDXL at 1024 px, Flux-dev at 1024 px (bf16 weights), Flux-dev at 1024 px with
    fp8 (e4m3fn) weights computed in bf16 (ComfyUI's manual cast, as its weight_dtype fp8 loads)

Figures: it/s and peak VRAM over the loaded model (torch.cuda.max_memory_allocated minus what
the loaded model holds), ours / theirs, and the adapter's memory against its analytic size.
Checks (pass or fail, with details): bf16 autocast training, fp16 training with its grad scaler,
an out-of-memory ending on a real CUDA allocation failure (the allocator capped with
set_per_process_memory_fraction) that releases the run's memory, resume exactness on CUDA
(4 steps straight = 2 steps, checkpoint, 2 resumed steps, bit for bit), and training with half
the model offloaded as ComfyUI's low-VRAM loading leaves it (same factors as fully loaded,
lower peak VRAM), a float8 base against the same numbers in bf16 (same factors, stored float8
untouched, lower peak VRAM) and the offloading input against the same run without it (same
factors, lower peak VRAM).

    .venv/bin/python scripts/bench_gpu.py             # on a GPU (make bench-gpu)
    .venv/bin/python scripts/bench_gpu.py --dry-run   # the same code paths, tiny model, CPU

Results: <out>/gpu-<time>.json, <out>/latest-gpu.json and <out>/latest-gpu.md (default out:
bench_output/; a dry run writes latest-gpu-dry-run.*).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import resource
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS for the resume check
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: harness
from harness import bench  # noqa: E402  (the same host, model builders and measured runs as `make bench`)

# (label, family, weight dtype, latent side): 512 px = latent 64, 1024 px = latent 128.
ROWS = [("SD1.5 512px", "SD15", "bf16", 64), ("SDXL 1024px", "SDXL", "bf16", 128),
        ("Flux-dev 1024px", "Flux", "bf16", 128), ("Flux-dev 1024px fp8 weights", "Flux", "fp8", 128)]
# check_dtype: the out-of-memory and resume checks' training dtype (fp32 on the CPU: bf16 there is slow)
GPU = {"rank": 16, "steps": 6, "pairs": 1, "budget_s": 420, "check_latent": 32, "oom_latent": 512,
       "check_dtype": "bf16"}
DRY = {"rank": 4, "steps": 2, "pairs": 1, "budget_s": 900, "check_latent": 8, "oom_latent": 512,
       "check_dtype": "fp32"}


def say(text: str) -> None:
    print(f"[bench-gpu] {text}", flush=True)


# --------------------------------------------------------------------------- rows


def model_for(host: bench.BenchHost, family: str, weights: str, dry: bool):
    torch = host.torch
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp8": torch.float8_e4m3fn}
    if dry:  # the tiny checkpoint stands in for every family, in the row's weight dtype
        return host.load_tiny(dtype=dtypes[weights])[0], "tiny"
    return bench.full_size_model(host, family, dtypes[weights])[0], family


def run_row(host: bench.BenchHost, cfg: dict, label: str, family: str, weights: str, latent: int, dry: bool) -> dict:
    t0 = time.perf_counter()
    mp, data_family = model_for(host, family, weights, dry)
    if dry:
        latent = 8
    latents, positive = bench.family_data(host, data_family, latent)
    n_params = sum(p.numel() for p in mp.model.diffusion_model.parameters())
    runs, theirs_error = {"ours": [], "theirs": []}, None
    for order in bench.pairs(cfg["pairs"]):
        for side in order:
            try:
                runs[side].append(bench.measured_run(host, side, mp, latents, positive, cfg["steps"], cfg["rank"],
                                                     "bf16", True))
            except Exception as err:  # e.g. TrainLoraNode 0.3.75 on Flux: its RMSNorm scales are inference tensors
                if side == "ours":
                    raise
                theirs_error = f"TrainLoraNode failed: {type(err).__name__}: {str(err)[:200]}"
                host.settle()
    if theirs_error:
        runs["theirs"] = [{k: None for k in runs["ours"][0]} for _ in runs["ours"]]
    cmp = bench.compare(runs, {"checkpointing": True})
    row = {"label": label, "family": family, "weights": weights, "latent": latent, "params": n_params,
           "rank": cfg["rank"], "steps": cfg["steps"], "theirs_error": theirs_error,
           "it_s_ours": 1 / cmp["step"]["ours_median"],
           "it_s_theirs": cmp["step"]["theirs_median"] and 1 / cmp["step"]["theirs_median"],
           "step_ratio": cmp["step"]["ratio_median"],
           "peak_ours_bytes": cmp["memory"]["ours_median"], "peak_theirs_bytes": cmp["memory"]["theirs_median"],
           "memory_ratio": cmp["memory"]["ratio_median"],
           "adapter_bytes": cmp["adapter_bytes"]["ours"], "adapter_theirs_bytes": cmp["adapter_bytes"]["theirs"],
           "analytic_adapter_bytes": bench.analytic_adapter_bytes(host, mp, cfg["rank"]),
           "seconds": time.perf_counter() - t0, "raw": cmp["raw"]}
    del mp
    host.settle()
    return row


# --------------------------------------------------------------------------- checks


def _train(host: bench.BenchHost, model, latents, positive, **inputs):
    """TrainTriLoRA as the executor runs it; returns its outputs."""
    torch = host.torch
    args = {"model": [model], "latents": latents, "positive": [positive], "steps": [2], "rank": [4], "seed": [0],
            "training_dtype": ["bf16"], "gradient_checkpointing": [True]}
    args.update({k: [v] for k, v in inputs.items()})
    with torch.inference_mode():
        return host.ours.execute(**args).result


def _finite_trained(host, out) -> dict:
    torch = host.torch
    layers = out[1].layers
    losses = out[2]["loss"]
    return {"losses": losses, "losses_finite": all(map(lambda v: v == v and abs(v) != float("inf"), losses)),
            "factors_finite": all(bool(torch.isfinite(t).all()) for layer in layers.values()
                                  for t in (layer.u, layer.s, layer.vt)),
            "s_moved": any(bool(layer.s.abs().max() > 0) for layer in layers.values()), "layers": len(layers)}


def check_bf16(host, model, data) -> dict:
    res = _finite_trained(host, _train(host, model, *data, training_dtype="bf16"))
    return {**res, "passed": res["losses_finite"] and res["factors_finite"] and res["s_moved"]}


def check_fp16(host, model, data) -> dict:
    torch = host.torch
    scales = []
    real_update = torch.amp.GradScaler.update

    def update(self, *a, **k):  # records that the run's scaler is live and what scale it used
        if self._enabled:
            scales.append(float(self.get_scale()))
        return real_update(self, *a, **k)

    torch.amp.GradScaler.update = update
    try:
        res = _finite_trained(host, _train(host, model, *data, training_dtype="fp16", steps=3))
    finally:
        torch.amp.GradScaler.update = real_update
    res["grad_scaler_scales"] = scales
    return {**res, "passed": res["losses_finite"] and res["factors_finite"] and res["s_moved"] and len(scales) == 3}


@contextlib.contextmanager
def capped_memory(host: bench.BenchHost, headroom_bytes: int):
    """Real allocation failures past ``headroom_bytes`` more than now: on CUDA the caching
    allocator's per-process fraction, on the CPU the address-space limit (RLIMIT_AS)."""
    torch = host.torch
    if host.device == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, (torch.cuda.memory_allocated() + headroom_bytes) / total))
        try:
            yield
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0)
        return
    size_kib = bench.status_kib("VmSize")
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (size_kib * 1024 + headroom_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def check_out_of_memory(host, model, data, cfg, loras: Path) -> dict:
    """A run that meets a latent far too big for the capped memory fails with the pack's
    out-of-memory error (an OutOfMemoryError) and gives its memory back."""
    torch = host.torch
    latents, positive = data
    big = {"samples": torch.randn(1, 4, cfg["oom_latent"], cfg["oom_latent"], generator=torch.Generator().manual_seed(1))}
    dtype = cfg["check_dtype"]
    _train(host, model, latents, positive, steps=1, checkpoint_prefix="gpu/warmup", training_dtype=dtype)
    host.settle()
    cuda = host.device == "cuda"
    before = torch.cuda.memory_allocated() if cuda else bench.status_kib("VmRSS") * 1024
    error = None
    with capped_memory(host, (2 << 30) if cuda else (512 << 20)):
        try:
            _train(host, model, [latents[0], big], positive, steps=3, checkpoint_prefix="gpu/oom", training_dtype=dtype)
        except Exception as err:
            error = err
    host.settle()
    after = torch.cuda.memory_allocated() if cuda else bench.status_kib("VmRSS") * 1024
    files = sorted(p.name for p in (loras / "gpu").glob("oom_*"))
    mro = [c.__name__ for c in type(error).__mro__] if error is not None else []
    res = {"error": None if error is None else f"{type(error).__name__}: {str(error)[:400]}", "mro": mro,
           "files": files, "memory_growth_bytes": after - before}
    res["passed"] = ("TrainingOutOfMemoryError" in mro and "OutOfMemoryError" in mro
                     and res["memory_growth_bytes"] < (256 << 20))
    return res


def check_resume(host, model, data, cfg, loras: Path) -> dict:
    torch = host.torch
    latents, positive = data
    dtype = cfg["check_dtype"]
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        straight = _train(host, model, latents, positive, steps=4, seed=3, checkpoint_every=2,
                          checkpoint_prefix="gpu/resume", training_dtype=dtype)
        ckpt = next(p for p in sorted((loras / "gpu").glob("resume_*_step000002.safetensors")))
        rest = _train(host, model, latents, positive, steps=2, seed=3, existing_lora=f"gpu/{ckpt.name}",
                      checkpoint_prefix="gpu/resumed", training_dtype=dtype)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    a, b = straight[1].layers, rest[1].layers
    diff = max(float((getattr(a[k], f) - getattr(b[k], f)).abs().max()) for k in a for f in ("u", "s", "vt"))
    equal = a.keys() == b.keys() and diff == 0.0
    return {"steps": [straight[3], rest[3]], "losses_straight": straight[2]["loss"], "losses_resumed": rest[2]["loss"],
            "max_abs_diff": diff, "passed": equal and rest[3] == 4 and rest[2]["loss"] == straight[2]["loss"][2:]}


@contextlib.contextmanager
def offloaded_after_sampler_load(host: bench.BenchHost, fraction: float):
    """ComfyUI's free-memory step on a card too small for the model: after the sampler's own
    load, ``LoadedModel.model_unload(memory_to_free)`` moves ``fraction`` of the model to the
    offload device, and training runs on it partially loaded (low VRAM). CUDA's peak-memory mark
    is reset there, so it covers the training steps, not the load."""
    import comfy.sampler_helpers

    real = comfy.sampler_helpers.prepare_sampling

    def prepare_sampling(model, *args, **kwargs):
        out = real(model, *args, **kwargs)
        if fraction:
            loaded = next(m for m in host.mm.current_loaded_models if m.model is model)
            loaded.model_unload(memory_to_free=int(model.model_size() * fraction))
        if host.device == "cuda":
            host.torch.cuda.empty_cache()
            host.torch.cuda.reset_peak_memory_stats()
        return out

    comfy.sampler_helpers.prepare_sampling = prepare_sampling
    try:
        yield
    finally:
        comfy.sampler_helpers.prepare_sampling = real
        host.mm.unload_all_models()


def check_low_vram(host, model, data, cfg) -> dict:
    """The same run fully loaded and with half the model offloaded (real host-device copies per
    forward on CUDA, through ComfyUI's offload stream): the same factors and losses, and the
    offloaded run's peak VRAM lower by the weights it left on the host."""
    torch = host.torch
    cuda = host.device == "cuda"
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    runs = {}
    try:
        for name, fraction in (("full", 0.0), ("offloaded", 0.5)):
            host.settle()
            with offloaded_after_sampler_load(host, fraction):
                out = _train(host, model, *data, steps=3, seed=5, training_dtype=cfg["check_dtype"])
            runs[name] = {"layers": out[1].layers, "losses": out[2]["loss"],
                          "peak_bytes": torch.cuda.max_memory_allocated() if cuda else None}
    finally:
        torch.use_deterministic_algorithms(deterministic)
    a, b = runs["full"]["layers"], runs["offloaded"]["layers"]
    diff = max(float((getattr(a[k], f) - getattr(b[k], f)).abs().max()) for k in a for f in ("u", "s", "vt"))
    loss_diff = max(abs(x - y) for x, y in zip(runs["full"]["losses"], runs["offloaded"]["losses"], strict=True))
    peaks = [runs[n]["peak_bytes"] for n in ("full", "offloaded")]
    return {"max_abs_diff": diff, "max_loss_diff": loss_diff, "peak_full_bytes": peaks[0],
            "peak_offloaded_bytes": peaks[1],
            "passed": a.keys() == b.keys() and diff <= 1e-2 and loss_diff <= 1e-2 and (not cuda or peaks[1] < peaks[0])}


def _peak_run(host, model, data, cfg, **inputs) -> dict:
    """One 3-step run from nothing loaded: its factors, losses and peak memory (CUDA: allocated
    over what was allocated before the run, so the weights the run loads count; CPU: None)."""
    torch, cuda = host.torch, host.device == "cuda"
    host.settle()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    out = _train(host, model, *data, steps=3, seed=5, training_dtype=cfg["check_dtype"], **inputs)
    peak = torch.cuda.max_memory_allocated() - before if cuda else None
    host.settle()
    return {"layers": out[1].layers, "losses": out[2]["loss"], "peak_bytes": peak}


def _same_factors(a: dict, b: dict) -> float:
    return max(float((getattr(a[k], f) - getattr(b[k], f)).abs().max()) for k in a for f in ("u", "s", "vt"))


def check_float8(host, data, cfg) -> dict:
    """A float8 (e4m3fn) base, loaded as UNETLoader's fp8_e4m3fn loads it, against the same numbers
    stored in bf16 (fp32 on the CPU): the same factors (exact: every float8 value is exact in bf16,
    and ComfyUI's manual cast is the only difference), the stored float8 tensors untouched, and
    lower peak memory on CUDA (the weights it loads are half the size)."""
    torch = host.torch
    fp8 = host.load_tiny(dtype=torch.float8_e4m3fn)[0]
    plain = host.load_tiny(dtype=torch.bfloat16 if host.device == "cuda" else torch.float32)[0]
    values = fp8.model.diffusion_model.state_dict()
    with torch.inference_mode():  # the loaded tensors are inference tensors, as the executor's are
        for key, tensor in plain.model.diffusion_model.state_dict().items():
            tensor.copy_(values[key].to(tensor.dtype))
    stored = {k: t.clone() for k, t in values.items()}
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        runs = {"fp8": _peak_run(host, fp8, data, cfg), "plain": _peak_run(host, plain, data, cfg)}
    finally:
        torch.use_deterministic_algorithms(deterministic)
    untouched = all(torch.equal(t.view(torch.uint8), stored[k].view(torch.uint8))
                    for k, t in fp8.model.diffusion_model.state_dict().items())
    diff = _same_factors(runs["fp8"]["layers"], runs["plain"]["layers"])
    peaks = [runs[n]["peak_bytes"] for n in ("fp8", "plain")]
    return {"max_abs_diff": diff, "losses_equal": runs["fp8"]["losses"] == runs["plain"]["losses"],
            "stored_untouched": untouched, "peak_fp8_bytes": peaks[0], "peak_plain_bytes": peaks[1],
            "passed": diff == 0.0 and untouched and (host.device != "cuda" or peaks[0] < peaks[1])}


def check_offloading(host, model, data, cfg) -> dict:
    """TrainTriLoRA's offloading input against the same run without it: the same factors and
    losses (the streamed weights are the same numbers) and, on CUDA, lower peak VRAM (the weights
    stay in CPU memory: on NVIDIA ComfyUI streams every layer) at the step time recorded."""
    torch = host.torch
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        runs = {}
        for name, offloading in (("whole", False), ("offloading", True)):
            t0 = time.perf_counter()
            runs[name] = _peak_run(host, model, data, cfg, offloading=offloading)
            runs[name]["seconds"] = time.perf_counter() - t0
    finally:
        torch.use_deterministic_algorithms(deterministic)
    diff = _same_factors(runs["whole"]["layers"], runs["offloading"]["layers"])
    peaks = [runs[n]["peak_bytes"] for n in ("whole", "offloading")]
    return {"max_abs_diff": diff, "losses_equal": runs["whole"]["losses"] == runs["offloading"]["losses"],
            "peak_whole_bytes": peaks[0], "peak_offloading_bytes": peaks[1],
            "seconds_whole": runs["whole"]["seconds"], "seconds_offloading": runs["offloading"]["seconds"],
            "passed": diff <= 1e-2 and (host.device != "cuda" or peaks[1] < peaks[0])}


def run_checks(host: bench.BenchHost, cfg: dict) -> dict:
    model = host.load_tiny()[0]
    data = bench.family_data(host, "tiny", cfg["check_latent"])
    out = {}
    for name, fn in (("bf16 autocast", lambda: check_bf16(host, model, data)),
                     ("fp16 with grad scaler", lambda: check_fp16(host, model, data)),
                     ("out of memory", lambda: check_out_of_memory(host, model, data, cfg, host.loras)),
                     ("resume exactness", lambda: check_resume(host, model, data, cfg, host.loras)),
                     ("low-VRAM loading", lambda: check_low_vram(host, model, data, cfg)),
                     ("float8 base", lambda: check_float8(host, data, cfg)),
                     ("offloading input", lambda: check_offloading(host, model, data, cfg))):
        t0 = time.perf_counter()
        try:
            out[name] = fn()
        except Exception as err:
            out[name] = {"passed": False, "error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-2000:]}
        out[name]["seconds"] = time.perf_counter() - t0
        say(f"check {name}: {'passed' if out[name]['passed'] else 'FAILED'} ({out[name]['seconds']:.0f} s)")
        host.settle()
    return out


# --------------------------------------------------------------------------- report


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [f"Run {results['started']}, {results['command']}, {results['elapsed_s']:.0f} s; "
             f"{m.get('gpu', 'no GPU (dry run on the CPU, tiny model)')}; torch {m['torch']}.", "",
             "| model | weights | ours it/s | theirs it/s | step ours/theirs | peak ours | peak theirs | "
             "memory ours/theirs | adapter measured / analytic |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        if "error" in r:
            lines.append(f"| {r['label']} | {r['weights']} | {r['error'][:120]} ||||||| ")
            continue
        if r.get("theirs_error"):
            lines.append(f"| {r['label']} ({r['params'] / 1e6:.0f}M) | {r['weights']} | {r['it_s_ours']:.2f} | "
                         f"{r['theirs_error'][:120]} | - | {r['peak_ours_bytes'] / 2**30:.2f} GiB | - | - | "
                         f"{r['adapter_bytes'] / 2**20:.0f} / {r['analytic_adapter_bytes'] / 2**20:.0f} MiB |")
            continue
        lines.append(f"| {r['label']} ({r['params'] / 1e6:.0f}M) | {r['weights']} | {r['it_s_ours']:.2f} | "
                     f"{r['it_s_theirs']:.2f} | {r['step_ratio']:.3f} | {r['peak_ours_bytes'] / 2**30:.2f} GiB | "
                     f"{r['peak_theirs_bytes'] / 2**30:.2f} GiB | {r['memory_ratio']:.3f} | "
                     f"{r['adapter_bytes'] / 2**20:.0f} / {r['analytic_adapter_bytes'] / 2**20:.0f} MiB |")
    lines += ["", "| check | result |", "|---|---|"]
    for name, c in results["checks"].items():
        detail = c.get("error") or ""
        lines.append(f"| {name} | {'passed' if c['passed'] else 'FAILED'} {detail[:200]} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="the same code paths on the tiny model, on the CPU")
    parser.add_argument("--out", default=str(bench.REPO / "bench_output"), help="folder for the results")
    parser.add_argument("--rows", default="all", help="comma-separated row numbers (1-4) or 'all'; 'none' for checks only")
    opts = parser.parse_args(argv)
    import torch

    if not opts.dry_run and not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py: no CUDA GPU here; run with --dry-run to check the script on the CPU")
    cfg = DRY if opts.dry_run else GPU
    device = "cpu" if opts.dry_run else "cuda"
    started = _dt.datetime.now().astimezone()
    results = {"schema": 1, "dry_run": opts.dry_run, "started": started.isoformat(timespec="seconds"),
               "command": " ".join(["python", "scripts/bench_gpu.py", *(argv if argv is not None else sys.argv[1:])]),
               "machine": bench.machine_info(), "config": cfg, "rows": [], "checks": {}}
    t0 = time.perf_counter()
    host = bench.BenchHost(device, 1 if opts.dry_run else 0)  # one CPU thread: see bench.py on shared machines
    chosen = range(len(ROWS)) if opts.rows == "all" else [] if opts.rows == "none" else \
        [int(n) - 1 for n in opts.rows.split(",")]
    for i in chosen:
        label, family, weights, latent = ROWS[i]
        if time.perf_counter() - t0 > cfg["budget_s"]:
            results["rows"].append({"label": label, "weights": weights, "error": "skipped: time budget spent"})
            continue
        say(f"{label} ({weights} weights)")
        try:
            row = run_row(host, cfg, label, family, weights, latent, opts.dry_run)
            theirs_peak = row["peak_theirs_bytes"] and row["peak_theirs_bytes"] / 2**30
            say(f"  {row['it_s_ours']:.2f} vs {bench.fmt(row['it_s_theirs'], 2)} it/s, peak "
                f"{row['peak_ours_bytes'] / 2**30:.2f} vs {bench.fmt(theirs_peak, 2)} GiB ({row['seconds']:.0f} s)"
                + (f"; {row['theirs_error']}" if row["theirs_error"] else ""))
        except Exception as err:  # one model that does not fit must not cost the others
            row = {"label": label, "weights": weights, "error": f"{type(err).__name__}: {str(err)[:300]}"}
            say(f"  failed: {row['error']}")
            host.settle()
        results["rows"].append(row)
    results["checks"] = run_checks(host, cfg)
    results["elapsed_s"] = time.perf_counter() - t0
    out = Path(opts.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    tag = "gpu-dry-run" if opts.dry_run else "gpu"
    text = json.dumps(results, indent=1, default=str)
    (out / f"{tag}-{started.strftime('%Y%m%d-%H%M%S')}.json").write_text(text)
    (out / f"latest-{tag}.json").write_text(text)
    md = markdown(results)
    (out / f"latest-{tag}.md").write_text(md)
    print(md)
    return 0 if all(c["passed"] for c in results["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
