#!/usr/bin/env python
"""`make bench`, monitoring part: what Train TriLoRA's evaluations and previews cost, each at its
default interval, as a share of the training time (goal: <= 10 %).

One process, the real ComfyUI (harness.bench.BenchHost: its progress hook is set, as a server's is,
so previews are sampled), the tiny SD1.5 checkpoint, 8 latents, rank 8, every layer kind adapted.
Sides, each a whole node run of --steps steps (default 400: two intervals of the defaults):

- drift: validate_every at its default, no held-out images: base drift on the zeroed caption;
- held-out: the same with validation_split 0.25 (2 of the 8 images held out) and keep_best held-out;
- preview: preview_every at its default, nothing else;
- all: held-out + drift + keep_best + previews at their defaults.

Within each run, the CPU time spent in the monitor's calls (every evaluation, the base
prediction, every preview) is timed and set against the run's training time (steps x the median
CPU time per step, from the progress hook): a ratio inside one run, so a shared machine's load,
which changes between runs, does not enter it. The median over rounds is the figure. One torch
thread, process CPU time.

    .venv/bin/python scripts/bench_monitor.py              # make bench runs it
    .venv/bin/python scripts/bench_monitor.py --quick      # smoke run (intervals scaled down)

Results: bench_output/monitor-latest.json and monitor-latest.md (git-ignored).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: harness
from harness import REPO  # noqa: E402
from harness.bench import BenchHost, cpu_name, median  # noqa: E402

GOAL = 0.10
STEPS = 400  # two intervals of the defaults, so the start and end evaluations weigh as in a real run
SIDES = ("drift", "held-out", "preview", "all")


def side_inputs(side: str, defaults: dict, scale: float) -> dict:
    every = {k: max(1, int(defaults[k] * scale)) for k in ("validate_every", "preview_every")}
    off = {"validate_every": 0, "preview_every": 0}
    return {
        "drift": {**off, "validate_every": every["validate_every"]},
        "held-out": {**off, "validate_every": every["validate_every"], "validation_split": 0.25,
                     "keep_best": "held-out"},
        "preview": {**off, "preview_every": every["preview_every"]},
        "all": {**every, "validation_split": 0.25, "keep_best": "held-out"},
    }[side]


class MonitorClock:
    """Process CPU time inside Monitor.begin and Monitor.after_step (less the loss handed to the
    listeners, which costs nothing): wraps the pack's Monitor class in place."""

    def __init__(self):
        import time

        monitor = next(m for n, m in sys.modules.items() if n.endswith("nodes.training.monitor")).Monitor
        self.seconds = 0.0
        for name in ("begin", "after_step"):
            original = getattr(monitor, name)

            def timed(*args, _original=original, **kwargs):
                start = time.process_time()
                try:
                    return _original(*args, **kwargs)
                finally:
                    self.seconds += time.process_time() - start

            setattr(monitor, name, timed)


def run(opts) -> dict:
    host = BenchHost("cpu", threads=1)
    clock = MonitorClock()
    torch = host.torch
    model, _ = host.load_tiny()
    g = torch.Generator().manual_seed(0)
    latents = [{"samples": torch.randn(8, 4, opts.latent, opts.latent, generator=g)}]
    positive = [[torch.randn(1, 77, 768, generator=g), {}]]
    node = host.ours
    defaults = {f: next(i.default for i in node.define_schema().inputs if i.id == f)
                for f in ("validate_every", "preview_every")}
    scale = opts.steps / STEPS if opts.quick else 1.0
    runs: dict[str, list] = {s: [] for s in SIDES}
    for r in range(opts.rounds):
        order = SIDES[r % len(SIDES):] + SIDES[: r % len(SIDES)]
        for side in order:
            kwargs = host.ours_inputs(model, latents, positive, opts.steps, 8, "fp32", False)
            kwargs.update({k: [v] for k, v in side_inputs(side, defaults, scale).items()})
            clock.seconds = 0.0
            result = host._timed(lambda kw=kwargs: node.execute(**kw))
            result["monitor_cpu_s"] = clock.seconds
            runs[side].append(result)
        print(f"[bench-monitor] round {r + 1}/{opts.rounds}: monitor / training CPU s " + ", ".join(
            f"{s} {runs[s][-1]['monitor_cpu_s']:.2f}/{opts.steps * runs[s][-1]['step_cpu_s']:.1f}" for s in SIDES),
            flush=True)
    overhead = {}
    for side in SIDES:
        shares = [x["monitor_cpu_s"] / (opts.steps * x["step_cpu_s"]) for x in runs[side]]
        overhead[side] = {"median": median(shares), "rounds": shares, "goal_met": median(shares) <= GOAL}
    return {"steps": opts.steps, "latent": opts.latent, "rounds": opts.rounds, "intervals": {
        k: max(1, int(v * scale)) for k, v in defaults.items()}, "overhead": overhead,
        "step_cpu_s": median([x["step_cpu_s"] for v in runs.values() for x in v]),
        "raw": {s: [{k: x[k] for k in ("total_s", "total_cpu_s", "step_cpu_s", "monitor_cpu_s")} for x in v]
                for s, v in runs.items()}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 20 steps, intervals scaled to match")
    parser.add_argument("--steps", type=int, default=0, help=f"steps per run (default {STEPS}; --quick 20)")
    parser.add_argument("--latent", type=int, default=8, help="latent side (x8 = pixels)")
    parser.add_argument("--rounds", type=int, default=0, help="rounds of all sides (default 3; --quick 1)")
    parser.add_argument("--out", default=str(REPO / "bench_output"), help="folder for the results")
    opts = parser.parse_args(argv)
    opts.steps = opts.steps or (20 if opts.quick else STEPS)
    opts.rounds = opts.rounds or (1 if opts.quick else 3)
    started = _dt.datetime.now().astimezone()
    result = {"started": started.isoformat(timespec="seconds"), "cpu": cpu_name(),
              "command": " ".join(["python", "scripts/bench_monitor.py", *(argv if argv is not None else sys.argv[1:])]),
              **run(opts)}
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "monitor-latest-quick" if opts.quick else "monitor-latest"
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    rows = [f"| {side} | {v['median']:+.1%} | {', '.join(f'{x:+.1%}' for x in v['rounds'])} | "
            f"{'yes' if v['goal_met'] else 'NO'} |" for side, v in result["overhead"].items()]
    md = (f"Run {result['started']}, {result['command']}; {result['cpu']}; {result['steps']} steps at latent "
          f"{result['latent']}, validate_every {result['intervals']['validate_every']}, preview_every "
          f"{result['intervals']['preview_every']}; training {result['step_cpu_s']:.3f} CPU s/step.\n\n"
          "| side | monitor / training time (median) | per round | <= 10 % |\n|---|---|---|---|\n" + "\n".join(rows) + "\n")
    (out / f"{name}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
