#!/usr/bin/env python
"""`make bench`, data-parallel part: the command-line trainer (train_trilora.py) on 1 rank and on
2 ranks under torchrun, steps/s and scaling efficiency.

Weak scaling, as DDP is judged: every rank keeps the same batch (--batch 1 image), so 2 ranks
train 2 images per step. Efficiency = images/s on 2 ranks / (2 x images/s on 1 rank). The 1-rank
run has 1 torch thread, what each rank has (torchrun sets OMP_NUM_THREADS=1 for several ranks), so
the ratio is what the second process adds. Also rank 0's CPU seconds per step (process time):
other processes on a shared machine do not inflate it, so its ratio says what the second rank
costs each rank (the all-reduce, the waiting), where wall time also says what the machine gave.
A run's figure is
its rank 0's own count (train_trilora.py logs steps/s after the first step: start-up, encoding and
the first step's allocations never count). Configurations run in rotation, --repeats times, and
the median is reported. On CUDA the ranks are GPUs (NCCL); with one GPU only the 1-rank figure.

    .venv/bin/python scripts/bench_distributed.py            # make bench runs it
    .venv/bin/python scripts/bench_distributed.py --steps 6 --repeats 1   # a quick look

Results: bench_output/distributed-latest.json and distributed-latest.md (git-ignored).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: harness
from harness import COMFY, REPO, TINY  # noqa: E402
from harness.bench import cpu_name  # noqa: E402

RATE_RE = re.compile(r"(\d+) steps on (\d+) ranks?; after the first step ([\d.]+) steps/s, ([\d.]+) images/s, "
                     r"([\d.]+) CPU s/step on rank 0")


def run_once(ranks: int, threads: int, args, work: Path) -> dict:
    """One CLI run; returns rank 0's steps/s and images/s and the wall time of the whole run."""
    config = work / "run.toml"
    config.write_text(f'checkpoint = "{TINY}"\nloras_dir = "{work / "loras"}"\nsize = {args.size}\n'
                      f'steps = {args.steps}\nrank = 8\nbatch_size = {args.batch}\ntraining_dtype = "{args.dtype}"\n'
                      f'gradient_checkpointing = false\nfilename_prefix = "bench/run"\n')
    cli = [str(REPO / "train_trilora.py"), "--config", str(config)]
    if ranks == 1:
        command = [sys.executable, *cli]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", *cli]
    env = dict(os.environ, COMFYUI_DIR=str(COMFY), OMP_NUM_THREADS=str(threads))
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - start
    found = RATE_RE.findall(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not found:
        raise SystemExit(f"bench_distributed: the {ranks}-rank run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    steps, got_ranks, per_second, images, cpu = found[-1]
    assert int(got_ranks) == ranks
    return {"steps_per_s": float(per_second), "images_per_s": float(images), "cpu_s_per_step": float(cpu),
            "run_wall_s": round(wall, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="steps per run (default 20)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each configuration (default 3)")
    parser.add_argument("--size", type=int, default=128, help="image side in px (default 128: latent 16x16)")
    parser.add_argument("--batch", type=int, default=1, help="images per rank per step (default 1)")
    args = parser.parse_args()

    import torch

    gpus = torch.cuda.device_count()
    device = torch.cuda.get_device_name(0) if gpus else cpu_name()
    args.dtype = "bf16" if gpus else "fp32"
    if gpus:  # one thread setting; the ranks are GPUs
        configs = [("1 rank", 1, 1)] + ([("2 ranks", 2, 1)] if gpus >= 2 else [])
    else:
        configs = [("1 rank, 1 thread", 1, 1), ("2 ranks, 1 thread each", 2, 1)]
    load_before = os.getloadavg()
    results = {name: [] for name, _, _ in configs}
    with tempfile.TemporaryDirectory(prefix="trilora-bench-dist-") as tmp:
        for repeat in range(args.repeats):
            for name, ranks, threads in configs:
                work = Path(tmp) / f"{repeat}-{ranks}-{threads}"
                work.mkdir()
                results[name].append(run_once(ranks, threads, args, work))
                print(f"{name}: {results[name][-1]}", flush=True)
    med = {name: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for name, runs in results.items()}
    one = med[configs[0][0]]["images_per_s"]
    one_cpu = med[configs[0][0]]["cpu_s_per_step"]
    lines = ["| configuration | steps/s (wall) | images/s (wall) | scaling efficiency, wall: images/s / (ranks x "
             "first row) | CPU s per step, rank 0 | scaling efficiency, CPU: first row / this |",
             "|---|---|---|---|---|---|"]
    for name, ranks, _ in configs:
        m = med[name]
        lines.append(f"| {name} | {m['steps_per_s']:.3f} | {m['images_per_s']:.3f} | "
                     f"{m['images_per_s'] / (ranks * one):.2f} | {m['cpu_s_per_step']:.3f} | "
                     f"{one_cpu / m['cpu_s_per_step']:.2f} |")
    record = {
        "time": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device, "gpus": gpus, "cpu_cores": os.cpu_count(), "torch": torch.__version__,
        "python": platform.python_version(), "settings": vars(args),
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "runs": results, "median": med,
    }
    out = REPO / "bench_output"
    out.mkdir(exist_ok=True)
    (out / "distributed-latest.json").write_text(json.dumps(record, indent=1))
    table = "\n".join(lines)
    (out / "distributed-latest.md").write_text(
        f"{record['time']}, {device}, {os.cpu_count()} cores, torch {torch.__version__}, {args.steps} steps, "
        f"{args.size} px, batch {args.batch} per rank, {args.dtype}; load average {load_before[0]:.1f} before, "
        f"{record['load_average_after'][0]:.1f} after\n\n{table}\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
