"""The training data's costs, measured side by side in one process (`make bench` section 8):
Encode Training Dataset (TriLoRA) with its cache (reading a written cache, and encoding while
writing one, against encoding with no cache), and TrainTriLoRA's step when it trains the text
encoders (captions encoded at every step through the CLIP) against the UNet-only step.

Each round runs every variant once, the order rotated; each figure is the median over rounds of
the ratio to that round's reference. The tiny SD1.5 checkpoint has a full-size CLIP-L and a
TAESD-shaped VAE, so the text-encoder ratio is far above a real model's (there the UNet dominates
the step) and the encode times are the small VAE's."""
from __future__ import annotations

import time

from . import TINY
from .bench import ratio_summary


def _clock(fn) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def _encode_rounds(host, node, images, captions, vae, clip, rounds: int) -> dict:
    """Per round: encode with no cache; encode into a new cache file; read that file back."""
    torch = host.torch
    times: dict = {"encoded": [], "written": [], "read": []}
    for r in range(rounds):
        path = str(host.loras.parent / f"bench_cache_{r}.safetensors")
        runs = {"encoded": "", "written": path, "read": path}
        order = ["encoded", "written", "read"] if r % 2 == 0 else ["written", "read", "encoded"]  # read after written
        for variant in order:
            with torch.inference_mode():
                times[variant].append(_clock(lambda c=runs[variant]: node.execute(
                    images=images, vae=[vae], clip=[clip], cache=[c], captions=captions)))
        host.settle()
    return times


def _train_rounds(host, latents, positive, captions, clip, cfg: dict) -> dict:
    """Per round: UNet only, then with the text encoders trained (rotated)."""
    base = host.ours_inputs(host.model, latents, positive, cfg["steps"], cfg["rank"], "fp32", True)
    base.update(positive=positive, target_layers=["attention"], validate_every=[0], preview_every=[0])  # one per image
    variants = {"unet": base, "text_encoders": {**base, "clip": [clip], "captions": captions,
                                                "text_encoder_lr": [1e-4]}}
    runs: dict = {v: [] for v in variants}
    for r in range(cfg["data_rounds"]):
        for name in list(variants)[r % 2:] + list(variants)[:r % 2]:
            runs[name].append(host._timed(lambda kw=variants[name]: host.ours.execute(**kw)))
    return runs


def section_data(host, cfg: dict, say) -> dict:
    """Section 8: cache ratios (``data_images`` pictures of ``data_side`` px) and the text-encoder step."""
    torch = host.torch
    with torch.inference_mode():
        host.model, clip, vae = host.nodes.CheckpointLoaderSimple().load_checkpoint(TINY)[:3]
    node = host.nodes.NODE_CLASS_MAPPINGS["TriLoRAEncodeDataset"]
    g = torch.Generator().manual_seed(0)
    side, n = cfg["data_side"], cfg["data_images"]
    images = [torch.rand(1, side, side, 3, generator=g) for _ in range(n)]
    captions = [f"trlstyle, a picture, number {i}" for i in range(n)]
    enc = _encode_rounds(host, node, images, captions, vae, clip, cfg["data_rounds"])
    say(f"  cache: encoded {enc['encoded'][-1][0]:.2f}s, written {enc['written'][-1][0]:.2f}s, "
        f"read {enc['read'][-1][0]:.3f}s")
    with torch.inference_mode():
        latents, positive = node.execute(images=images, vae=[vae], clip=[clip], cache=[""], captions=captions).result
    train = _train_rounds(host, latents, positive, captions, clip, cfg)
    say(f"  step: UNet only {train['unet'][-1]['step_cpu_s']:.3f}s, text encoders "
        f"{train['text_encoders'][-1]['step_cpu_s']:.3f}s")
    del host.model
    host.settle()

    def ratio(ours, ref):
        return ratio_summary([w for w, _ in ours], [w for w, _ in ref], [c for _, c in ours], [c for _, c in ref])

    steps = [train["text_encoders"], train["unet"]]
    return {"cache_read": ratio(enc["read"], enc["encoded"]), "cache_written": ratio(enc["written"], enc["encoded"]),
            "te_step": ratio_summary(*([x["step_s"] for x in s] for s in steps),
                                     *([x["step_cpu_s"] for x in s] for s in steps)),
            "setting": {"images": n, "side": side, "rank": cfg["rank"], "steps": cfg["steps"]}}


def summary(data: dict, add) -> None:
    """Section 8's rows for bench.py's table: ``add(name, label, ratio_summary dict)``."""
    st = data["setting"]
    what = f"{st['images']} pictures of {st['side']} px, tiny SD1.5"
    add("cache_read", f"8. Encode Training Dataset, cache read / encoded ({what})", data["cache_read"])
    add("cache_written", f"8. Encode Training Dataset, encoded + cache written / encoded ({what})",
        data["cache_written"])
    add("te_step", f"8. training step, text encoders trained / UNet only (rank {st['rank']}, full-size "
        "CLIP-L, attention layers)", data["te_step"])
