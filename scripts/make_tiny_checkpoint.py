"""Generates the tiny SD1.5-shaped checkpoint used by the tests and the demo.

It is a test fixture, not a model: random weights, so images are noise. ComfyUI detects it as
SD1.5 because the shapes are SD1.5's where detection looks (model_channels 320, context_dim 768,
a full-size CLIP-L), while the UNet has one level and one res block (about 26M parameters) and
the VAE is TAESD-shaped. The same seed gives the same bytes.

    python scripts/make_tiny_checkpoint.py --comfyui .comfyui          # into its checkpoints folder
    python scripts/make_tiny_checkpoint.py --output /tmp/tiny.safetensors --force
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

FILE_NAME = "trilora-tiny-sd15.safetensors"
SEED = 20261125

UNET_CONFIG = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=1,
    channel_mult=(1,), num_heads=8, transformer_depth=[1], transformer_depth_middle=1,
    transformer_depth_output=[1, 1], context_dim=768,
    use_spatial_transformer=True, use_linear_in_transformer=False, legacy=False,
)


def model_shapes() -> dict[str, torch.Size]:
    """Checkpoint key -> shape, read off ComfyUI's own modules built on the meta device."""
    import comfy.options

    sys.argv = [sys.argv[0], "--cpu"]  # shapes only: never touch a GPU
    comfy.options.enable_args_parsing()
    import comfy.clip_model
    import comfy.ops
    import comfy.sd1_clip
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from comfy.taesd.taesd import TAESD

    ops = comfy.ops.disable_weight_init
    parts = {
        "model.diffusion_model.": UNetModel(**UNET_CONFIG, device="meta", operations=ops),
        "cond_stage_model.transformer.": comfy.clip_model.CLIPTextModel(
            _clip_l_config(comfy.sd1_clip), dtype=torch.float32, device="meta", operations=ops),
    }
    with torch.device("meta"):
        parts["first_stage_model."] = TAESD()
    return {prefix + k: v.shape for prefix, module in parts.items() for k, v in module.state_dict().items()}


def _clip_l_config(sd1_clip) -> dict:
    import json
    path = Path(sd1_clip.__file__).with_name("sd1_clip_config.json")
    return json.loads(path.read_text())


def fill(key: str, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """Deterministic values that keep every activation finite: unit norms, zero biases,
    1/sqrt(fan_in) weights, small embeddings. ComfyUI leaves unset weights uninitialised."""
    if len(shape) == 0:
        return torch.tensor(1.0 if key.endswith("vae_scale") else 0.0)
    if key.endswith(".bias"):
        return torch.zeros(shape)
    if len(shape) == 1:
        return torch.ones(shape)
    if "embedding" in key:
        return torch.randn(shape, generator=generator) * 0.02
    fan_in = shape[1:].numel()
    return torch.randn(shape, generator=generator) / fan_in ** 0.5


def build(seed: int = SEED) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {k: fill(k, shape, generator).to(torch.float16).contiguous()
            for k, shape in sorted(model_shapes().items())}


def write(path: Path, seed: int = SEED) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = build(seed)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; a model file is for every user
    try:
        # One metadata entry only: safetensors writes a map's entries in no fixed order.
        save_file(tensors, tmp, metadata={"description": f"comfyui-trilora test fixture, random weights, seed {seed}"})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui", type=Path, default=Path(os.environ.get("COMFYUI_DIR", ".comfyui")),
                        help="ComfyUI folder (its modules give the shapes; default output is its checkpoints)")
    parser.add_argument("--output", type=Path, help="file to write instead")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--force", action="store_true", help="write even if the file exists")
    args = parser.parse_args()

    sys.path.insert(0, str(args.comfyui.resolve()))
    path = args.output or args.comfyui / "models" / "checkpoints" / FILE_NAME
    if path.exists() and not args.force:
        return
    write(path, args.seed)
    print(f"[setup] wrote {path}")


if __name__ == "__main__":
    main()
