"""Run by test_out_of_memory.py in its own process: TrainTriLoRA meets a real allocation failure.

The process boots ComfyUI with the pack, trains once to warm up, then caps its own address space
(RLIMIT_AS) a little above what it uses. A run whose third step meets a latent far too large for
that cap must fail with the pack's error; a small run must then still fit under the same cap (the
failed run's memory was given back), and the saved adapter must resume. Prints one JSON line.

    python oom_child.py LORAS_DIR OUTPUT_DIR HEADROOM_MIB BIG_LATENT_SIDE
"""
from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: harness
from harness import TINY, host  # noqa: E402

host.start()  # before torch and ComfyUI's modules: ComfyUI reads its command line at the first import
import torch  # noqa: E402


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def main(loras: str, output: str, headroom_mib: str, big_side: str) -> dict:
    h = host.boot(Path(loras), Path(output))
    nodes = h.nodes
    cls = nodes.NODE_CLASS_MAPPINGS["TrainTriLoRA"]
    gen = torch.Generator().manual_seed(0)
    small = [{"samples": torch.randn(1, 4, 8, 8, generator=gen)} for _ in range(2)]
    big = {"samples": torch.randn(1, 4, int(big_side), int(big_side), generator=gen)}
    with torch.inference_mode():
        model, clip = nodes.CheckpointLoaderSimple().load_checkpoint(TINY)[:2]
        positive = nodes.CLIPTextEncode().encode(clip, "a test")[0]

    def train(latents, steps, prefix, existing="[None]"):
        with torch.inference_mode():  # as the executor runs nodes
            out = cls.execute(model=[model], latents=latents, positive=[positive], steps=[steps], seed=[14],
                              training_dtype=["fp32"], gradient_checkpointing=[False], rank=[4],
                              checkpoint_prefix=[prefix], existing_lora=[existing])
        return out.result

    train(small, 1, "oom/warmup")  # threads, caches and allocator arenas exist from here on
    cap = status_kib("VmSize") * 1024 + int(headroom_mib) * 2 ** 20
    resource.setrlimit(resource.RLIMIT_AS, (cap, resource.RLIM_INFINITY))
    result = {"cap_bytes": cap}
    rss_before = status_kib("VmRSS")
    try:
        # Image 0, the big one (a bucket of its own), comes first at step 3; seed 14 draws the small
        # ones at steps 1 and 2 as the straight run below (one bucket) does.
        train([big] + small, 6, "oom/run")
        result["error"] = None
    except Exception as err:  # the test checks the type by name: the pack's module is loaded by path
        result["error"] = {"mro": [c.__name__ for c in type(err).__mro__], "message": str(err)}
    result["rss_growth_kib"] = status_kib("VmRSS") - rss_before
    result["files"] = sorted(p.name for p in Path(loras, "oom").iterdir())
    # The user swaps the big image for one that fits and resumes from the saved adapter. Under the
    # same cap, which only holds if the failed run's memory was released; the result must be the
    # same as a run that never met the big image.
    fits = [{"samples": torch.randn(1, 4, 8, 8, generator=gen)}] + small
    straight = train(fits, 4, "oom/straight")
    last_good = next(p for p in result["files"] if p.endswith("_last_good.safetensors"))
    resumed = train(fits, 2, "oom/resumed", existing="oom/" + last_good)
    result["steps"] = {"straight": straight[3], "resumed": resumed[3]}
    a, b = straight[1].layers, resumed[1].layers
    result["resumed_equals_straight"] = a.keys() == b.keys() and all(
        torch.equal(getattr(a[k], f), getattr(b[k], f)) for k in a for f in ("u", "s", "vt"))
    return result


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(*sys.argv[1:])), flush=True)
