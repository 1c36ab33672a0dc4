"""`make demo`, the main job: train a style with the pack's own workflow, then generate with it.

It starts a headless ComfyUI server with the pack on 127.0.0.1 (a free port), opens the server's
own frontend in headless Chromium, and converts the two workflow files users drag into ComfyUI
(workflows/trilora_train_style.json, workflows/trilora_generate.json) with the frontend's own
converter, app.graphToPrompt(), its checkpoint widget pointed at the model. Then it queues them:

1. training: the bundled sample images and captions -> Train TriLoRA -> Save TriLoRA, the loss
   graph, the training curves (TriLoRA Training Curves: loss and base drift), and previews at
   several strengths through Apply TriLoRA;
2. generation: Load TriLoRA with the file just trained, at several strengths.

Everything lands in demo_output/ (see the README's "make demo" section). By default it runs on the
tiny drawing checkpoint (harness/fixtures/drawing.py: a VAE that keeps flat colours and a UNet pretrained on
captioned flat shapes without a frame, built once by `make setup`) at 128 px, in a few minutes on
a CPU: the style's thick black frame appears with the strength. The generated pictures are put in
one strip (strengths.png) and measured: the frame contrast (border against centre luminance) at
each strength, against the sample pictures', and whether the prompt's large shape keeps its
colour. `--random` uses the random tiny test checkpoint instead (plumbing only: its images are
noise); `make demo CKPT=/path/to/model.safetensors` a real SD1.5 checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # harness, and trilora_core (pure torch) to read the trained file
from harness.browser import ComfyBrowser, Converted  # noqa: E402
from harness.server import ComfyError, ComfyServer, execution_error  # noqa: E402

TINY = "trilora-tiny-sd15.safetensors"
TINY_SIZE, TINY_TRAIN_STEPS, TINY_SAMPLE_STEPS = 64, 30, 4
DRAWING = "trilora-drawing-sd15.safetensors"  # harness/fixtures/drawing.FILE_NAME
# Train TriLoRA runs at its own defaults; only the steps differ from the workflow's. On the drawing
# model the defaults draw the frame by step 50-100 and overshoot it by 200 (the frame darkens,
# the shapes wash out: `make bench-method`'s picture section), so the demo stops at 100.
DRAWING_SIZE, DRAWING_TRAIN_STEPS, DRAWING_SAMPLE_STEPS = 128, 100, 12
TRAIN_WORKFLOW = REPO / "workflows" / "trilora_train_style.json"
GENERATE_WORKFLOW = REPO / "workflows" / "trilora_generate.json"
MARKER = ".trilora-demo"  # marks a folder the demo made, so a rerun may empty it


def say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


class Progress:
    """One status line while a prompt runs: node, step counter and the node's own text."""

    def __init__(self, prompt: dict, label: str):
        self.types = {k: v["class_type"] for k, v in prompt.items()}
        self.label = label
        self.tty = sys.stdout.isatty()
        self.last = None
        self.last_print = 0.0

    def __call__(self, state: dict) -> None:
        node = state.get("node")
        if node is None:
            return
        line = f"{self.label}: {self.types.get(node, node)}"
        if state.get("max"):
            line += f" {state['value']}/{state['max']}"
        if state.get("text"):
            line += f"  {state['text']}"
        if line == self.last:
            return
        changed_node = self.last is None or not self.last.startswith(f"{self.label}: {self.types.get(node, node)}")
        self.last = line
        if self.tty:
            print(f"\r[demo] {line[:110]:<110}", end="", flush=True)
        elif changed_node or time.time() - self.last_print > 5:  # logs: a line per node, or every 5 s
            self.last_print = time.time()
            say(line)

    def done(self) -> None:
        if self.tty and self.last:
            print()


def prepare_output(out: Path) -> None:
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise SystemExit(f"{out} exists and was not made by the demo; give another --out")
    shutil.rmtree(out, ignore_errors=True)
    (out / "workflows").mkdir(parents=True)
    (out / MARKER).write_text("made by scripts/demo.py; emptied on its next run\n")


def run_prompt(server: ComfyServer, converted, label: str, timeout: float) -> tuple[dict, float]:
    progress = Progress(converted.prompt, label)
    start = time.time()
    try:
        entry = server.run(converted.prompt, converted.workflow, timeout=timeout, on_progress=progress)
    finally:
        progress.done()
    seconds = time.time() - start
    if entry["status"]["status_str"] != "success":
        error = execution_error(entry) or {}
        raise ComfyError(f"{label} failed in {error.get('node_type', '?')}: {error.get('exception_message', entry['status'])}"
                         f"\nserver log: {server.log_path}")
    return entry, seconds


def save_outputs(server: ComfyServer, entry: dict, prompt: dict, out: Path, names: dict[str, str]) -> list[Path]:
    """Fetches the images the output nodes reported (through /view) into out/, named by
    names[node title] or else by the title ("Preview: strength 0.5" -> preview_strength_0.5.png)."""
    saved = []
    for node_id, output in sorted(entry["outputs"].items(), key=lambda item: int(item[0])):
        title = prompt[node_id].get("_meta", {}).get("title", prompt[node_id]["class_type"])
        stem = names.get(title) or "_".join(title.lower().replace(":", " ").split())
        for n, image in enumerate(output.get("images", [])):
            path = out / (f"{stem}.png" if n == 0 else f"{stem}_{n}.png")
            path.write_bytes(server.file(image))
            saved.append(path)
    return saved


def rank_text(counts: Counter) -> str:
    """"rank 8" or "rank 8 (1 layer with 4: it has fewer channels)"."""
    common = counts.most_common(1)[0][0]
    others = sorted(r for r in counts if r != common)
    if not others:
        return f"rank {common}"
    n = sum(counts[r] for r in others)
    return (f"rank {common} ({n} layer{'s' if n > 1 else ''} with {', '.join(map(str, others))}: "
            f"{'they have' if n > 1 else 'it has'} fewer channels)")


def describe_file(path: Path) -> dict:
    from trilora_core import read_trilora

    adapter = read_trilora(str(path))
    ranks = sorted(int(layer.s.shape[0]) for layer in adapter.layers.values())
    counts = Counter(ranks)
    meta = adapter.metadata or {}
    losses = json.loads(meta.get("trilora_loss_history", "[]") or "[]")
    return {"layers": len(ranks), "rank_min": ranks[0], "rank_max": ranks[-1], "ranks": dict(sorted(counts.items())),
            "rank_text": rank_text(counts),
            "steps": int(meta.get("trilora_steps", meta.get("ss_steps", 0)) or 0),
            "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
            "size_bytes": path.stat().st_size}


def main() -> int:
    parser = argparse.ArgumentParser(description="Train a TriLoRA with the pack's workflow, then generate with it.")
    parser.add_argument("--ckpt", type=Path, help="an SD1.5 checkpoint (default: the tiny test checkpoint)")
    parser.add_argument("--out", type=Path, default=REPO / "demo_output")
    parser.add_argument("--train-steps", type=int,
                        help=f"default: {DRAWING_TRAIN_STEPS} on the drawing model, {TINY_TRAIN_STEPS} with --random, "
                             "else the workflow's")
    parser.add_argument("--sample-steps", type=int,
                        help=f"default: {DRAWING_SAMPLE_STEPS} on the drawing model, {TINY_SAMPLE_STEPS} with --random, "
                             "else the workflow's")
    parser.add_argument("--size", type=int,
                        help=f"training and image size; default: {DRAWING_SIZE} on the drawing model, {TINY_SIZE} with "
                             "--random, else 512")
    parser.add_argument("--random", action="store_true",
                        help=f"the random tiny test checkpoint instead of the drawing one ({TINY_SIZE} px, "
                             f"{TINY_TRAIN_STEPS} steps: plumbing only, its images are noise)")
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.0, 0.5, 1.0, 1.5],
                        help="strengths for the generation workflow")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per prompt")
    args = parser.parse_args()
    args.drawing = args.ckpt is None and not args.random

    started = time.time()
    comfy = Path(os.environ.get("COMFYUI_DIR") or REPO / ".comfyui").resolve()
    tiny = args.ckpt is None
    if not tiny and not args.ckpt.is_file():
        raise SystemExit(f"--ckpt {args.ckpt}: no such file")
    if tiny and not (comfy / "models" / "checkpoints" / TINY).is_file():
        raise SystemExit(f"{TINY} is missing from {comfy}/models/checkpoints: run `make setup`")
    ckpt_name = TINY if tiny else args.ckpt.name
    if args.drawing:  # built once by make setup; the fixture script rebuilds it only if missing or stale
        subprocess.run([sys.executable, str(REPO / "scripts" / "make_tiny_checkpoint.py"), "--comfyui", str(comfy),
                        "--drawing"], check=True)
        ckpt_name = DRAWING
        args.size, args.sample_steps = args.size or DRAWING_SIZE, args.sample_steps or DRAWING_SAMPLE_STEPS
        args.train_steps = args.train_steps or DRAWING_TRAIN_STEPS
    out = args.out.resolve()
    prepare_output(out)

    with tempfile.TemporaryDirectory(prefix="trilora-demo-") as tmp:
        tmp = Path(tmp)
        for d in ("output", "user"):
            (tmp / d).mkdir()
        # The demo's folder is the first loras folder, so Save TriLoRA writes the trained file
        # straight into it; a --ckpt file is seen where it lies.
        paths = f"trilora_demo:\n  is_default: true\n  loras: {out}\n"
        if not tiny:
            paths += f"  checkpoints: {args.ckpt.resolve().parent}\n"
        (tmp / "extra_model_paths.yaml").write_text(paths)
        say(f"starting ComfyUI ({comfy}) on 127.0.0.1 with the pack ...")
        server = ComfyServer.start(comfy, tmp / "output", tmp / "user", out / "server.log",
                                   extra_model_paths=tmp / "extra_model_paths.yaml",
                                   python=str(REPO / ".venv" / "bin" / "python"))
        try:
            return run(server, args, out, ckpt_name, tiny, started)
        finally:
            server.stop()


def workflow_overrides(args, ckpt_name: str, tiny: bool, on_cpu: bool) -> tuple[dict, int | None, int | None]:
    """Widget values to set in the training workflow (by node type), the train steps and the image size."""
    size = args.size or (TINY_SIZE if tiny else None)
    train_steps = args.train_steps or (TINY_TRAIN_STEPS if tiny else None)
    sample_steps = args.sample_steps or (TINY_SAMPLE_STEPS if tiny else None)
    train = {"CheckpointLoaderSimple": {"ckpt_name": ckpt_name}}
    if on_cpu:  # bf16 autocast is slow or missing on many CPUs; gradient checkpointing only saves memory
        train["TrainTriLoRA"] = {"training_dtype": "fp32", "gradient_checkpointing": False}
    if train_steps:
        train.setdefault("TrainTriLoRA", {})["steps"] = train_steps
    if size:
        train["TriLoRASampleImages"] = {"size": size}
        train["EmptyLatentImage"] = {"width": size, "height": size}
    if sample_steps:
        train["KSampler"] = {"steps": sample_steps}
    return train, train_steps, size


def run(server: ComfyServer, args, out: Path, ckpt_name: str, tiny: bool, started: float) -> int:
    on_cpu = all(d.get("type") == "cpu" for d in server.get("/system_stats").get("devices", []))
    train, train_steps, size = workflow_overrides(args, ckpt_name, tiny, on_cpu)

    say("opening the ComfyUI frontend in headless Chromium to convert the workflows ...")
    with ComfyBrowser(server) as browser:
        converted_train = browser.convert(json.loads(TRAIN_WORKFLOW.read_text()), train, name=TRAIN_WORKFLOW.stem)
        generate = {key: value for key, value in train.items() if key in ("CheckpointLoaderSimple", "KSampler",
                                                                          "EmptyLatentImage")}
        # Loaded now, and left open: once training ran, the trained file's name and each strength
        # are set in this graph and converted again.
        generate_json = json.loads(GENERATE_WORKFLOW.read_text())
        converted_generate = browser.convert(generate_json, generate, name=GENERATE_WORKFLOW.stem)
        if browser.blocked:
            say(f"(the frontend tried {len(browser.blocked)} outside address(es); all were blocked)")

        (out / "workflows" / "trilora_train_style.api.json").write_text(json.dumps(converted_train.prompt, indent=2))
        types = sorted({n["class_type"] for n in converted_train.prompt.values()})
        say(f"training workflow: {len(converted_train.prompt)} nodes ({', '.join(types)})")
        say(f"model {ckpt_name}; {'CPU' if on_cpu else 'GPU'}; "
            f"train steps {train_steps or 'as in the workflow'}, image size {size or 'as in the workflow'}")
        entry, train_seconds = run_prompt(server, converted_train, "training", args.timeout)
        trained = sorted(p for p in out.glob("*.safetensors"))
        if len(trained) != 1:
            raise ComfyError(f"expected one trained file in {out}, found {[p.name for p in trained]}")
        trained = trained[0]
        images = save_outputs(server, entry, converted_train.prompt, out, {
            "Plot Loss Graph": "loss_graph", "Training curves: loss, held-out, drift": "training_curves"})
        say(f"trained in {train_seconds:.1f} s: {trained.name}; wrote {', '.join(p.name for p in images)}")

        generated, gen_seconds = [], 0.0
        for strength in args.strengths:
            browser.set_widgets({"TriLoRALoader": {"trilora_name": trained.name, "strength_model": strength,
                                                   "strength_clip": strength}})
            prompt, workflow = browser.graph_to_prompt()
            converted = Converted(prompt, workflow, converted_generate.loaded)
            if strength == args.strengths[0]:
                (out / "workflows" / "trilora_generate.api.json").write_text(json.dumps(prompt, indent=2))
            entry, seconds = run_prompt(server, converted, f"generate (strength {strength})", args.timeout)
            gen_seconds += seconds
            generated += save_outputs(server, entry, prompt, out, {"Save Image": f"generate_strength_{strength}"})

    info = describe_file(trained)
    positive = next(n["inputs"]["text"] for n in converted_generate.prompt.values()
                    if n.get("_meta", {}).get("title") == "Positive prompt")
    style = measure_style(generated, args.strengths, positive, out / "strengths.png")
    summary = {
        "model": ckpt_name, "device": "cpu" if on_cpu else "gpu",
        "trained_file": str(trained), "steps": info["steps"], "layers": info["layers"],
        "ranks": info["ranks"],  # rank -> number of layers
        "first_loss": info["first_loss"], "final_loss": info["final_loss"],
        "training_seconds": round(train_seconds, 1), "generation_seconds": round(gen_seconds, 1),
        "total_seconds": round(time.time() - started, 1),
        "loss_graph": str(out / "loss_graph.png"), "training_curves": str(out / "training_curves.png"),
        "training_previews": [str(p) for p in images if p.name.startswith("preview_")],
        "generated": [str(p) for p in generated], "strengths": args.strengths,
        "strip": str(out / "strengths.png"), "style": style,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    print_summary(summary, info, args, trained, out, tiny)
    return 0


def print_summary(summary: dict, info: dict, args, trained: Path, out: Path, tiny: bool) -> None:
    loss = (f"{info['first_loss']:.4f} -> {info['final_loss']:.4f}" if info["final_loss"] is not None else "n/a")
    print()
    print("TriLoRA demo finished")
    print(f"  model         {summary['model']} ({summary['device'].upper()})")
    print(f"  training      {info['steps']} steps in {summary['training_seconds']:.1f} s, loss {loss}")
    print(f"  adapter       {info['layers']} layers, {info['rank_text']}, {info['size_bytes'] / 1e6:.1f} MB")
    print(f"  trained file  {trained}")
    print(f"  loss graph    {out / 'loss_graph.png'}; training curves (loss, base drift): "
          f"{out / 'training_curves.png'}")
    print(f"  previews      {len(summary['training_previews'])} from the training workflow (preview_strength_*.png)")
    print(f"  generated     {len(summary['generated'])} images at strengths {', '.join(map(str, args.strengths))} "
          f"(generate_strength_*.png) in {summary['generation_seconds']:.1f} s; strip: strengths.png")
    print("  frame contrast (border - centre luminance; the sample pictures: "
          f"{summary['style']['sample_frame_contrast']:+.3f}):")
    for strength, value in zip(args.strengths, summary['style']["frame_contrast"], strict=True):
        print(f"    strength {strength:<4} {value:+.3f}")
    colour = summary['style']["content"]
    if colour:
        print(f"  content       the large shape is {colour['colour']!r} in the prompt; at strength 1.0 its "
              f"region is nearest to {colour['nearest']!r} (distance {colour['distance']:.2f})")
    print(f"  total         {summary['total_seconds']:.1f} s; everything is in {out}/ (summary.json, server.log)")
    if tiny and not args.drawing:
        print("  (--random: the tiny test model has random weights, its images are noise)")


def measure_style(images: list[Path], strengths: list[float], prompt: str, strip: Path) -> dict:
    """The generated pictures in one strip, labelled by strength, and measured: the frame's contrast
    at each strength (harness.picture_stats.frame_contrast), the same on the sample pictures, and the
    colour of the prompt's large shape at strength 1.0 if there is one."""
    import re

    from PIL import Image, ImageDraw

    from harness import picture_stats
    from harness.fixtures import drawing, sample_images

    pictures = [Image.open(p).convert("RGB") for p in images]
    side = pictures[0].height
    label = 18
    sheet = Image.new("RGB", (side * len(pictures) + 4 * (len(pictures) - 1), side + label), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (picture, strength) in enumerate(zip(pictures, strengths, strict=True)):
        x = i * (side + 4)
        sheet.paste(picture, (x, label))
        draw.text((x + 4, 3), f"strength {strength:g}", fill="black")
    sheet.save(strip)
    samples = drawing.sample_style_pictures(side)
    result = {"frame_contrast": [round(picture_stats.frame_contrast(p), 4) for p in pictures],
              "sample_frame_contrast": round(float(sum(picture_stats.frame_contrast(s) for s in samples) / len(samples)), 4),
              "content": None}
    match = re.search(r"\blarge (\w+) ", prompt)
    if match and 1.0 in strengths and match.group(1) in sample_images.COLOURS:
        measured = picture_stats.colour_distance(pictures[strengths.index(1.0)], match.group(1))
        result["content"] = {"colour": match.group(1), **measured}
    return result


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ComfyError as e:
        print(f"[demo] failed: {e}", file=sys.stderr)
        sys.exit(1)
