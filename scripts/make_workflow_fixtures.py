"""Builds the random model files the SDXL and Flux workflows run on in the tests, loaded by the
loaders those workflows use. Test fixtures, not models: images come out as noise.

ComfyUI 0.3.75 builds some parts from fixed configs whatever the file holds, so these are larger
than the per-family fixtures of make_tiny_checkpoint.py:
- SDXL (CheckpointLoaderSimple): the tiny SDXL UNet of make_tiny_checkpoint.py, a full-size CLIP-L
  and CLIP-G (both built from fixed configs; CLIP-G has 694M parameters) and a TAESD-shaped VAE.
- Flux (UNETLoader): ComfyUI fixes Flux's width (3072, 24 heads of 128), so the model is full
  width with one double block and no single block (394M parameters, bf16); its txt_in and
  vector_in take CLIP-L's 768-wide output (ComfyUI reads those widths off the weights).
  DualCLIPLoader's T5-XXL is built from a fixed config (4.7B parameters: 19 GB in fp32 on a CPU)
  whatever the file holds, and no smaller T5 is accepted for Flux, so the tests load a CLIP-L
  (CLIPLoader) in its place. The VAE is TAESD-shaped with 16 latent channels (taef1's layout).

    python scripts/make_workflow_fixtures.py --comfyui .comfyui     # into its model folders
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_tiny_checkpoint as tiny  # noqa: E402

SEED = 20261130
SDXL_CHECKPOINT = "trilora-tiny-sdxl-checkpoint.safetensors"
FLUX_MODEL = "trilora-tiny-flux-dev-fullwidth.safetensors"
CLIP_L = "trilora-tiny-clip-l.safetensors"
FLUX_VAE = "trilora-tiny-taef1.safetensors"
FLUX_CONFIG = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=768,
                   hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=1, depth_single_blocks=0,
                   axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True)


def _meta_state(module_factory) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return module_factory().state_dict()


def _clip(config_name: str) -> dict[str, torch.Tensor]:
    """A CLIP text model's weights in ComfyUI's (transformers') names, on the meta device."""
    import json

    import comfy.clip_model
    import comfy.ops
    import comfy.sd1_clip

    config = json.loads((Path(comfy.sd1_clip.__file__).parent / config_name).read_text())
    return _meta_state(lambda: comfy.clip_model.CLIPTextModel(config, dtype=torch.float32, device="meta",
                                                              operations=comfy.ops.disable_weight_init))


def _taesd(prefix: str, latent_channels: int) -> dict[str, torch.Tensor]:
    from comfy.taesd.taesd import TAESD

    return {prefix + k: v for k, v in _meta_state(lambda: TAESD(latent_channels=latent_channels)).items()}


def shapes(name: str) -> dict[str, torch.Size]:
    """File key -> shape of one of the files (SDXL_CHECKPOINT, FLUX_MODEL, CLIP_L, FLUX_VAE)."""
    tiny._comfy()
    if name == SDXL_CHECKPOINT:
        import comfy.supported_models

        family = tiny.FAMILIES["sdxl"]
        unet = {"model.diffusion_model." + k: torch.empty(v, device="meta")
                for k, v in tiny.diffusion_model_shapes(family).items()}
        clip = {"clip_l.transformer." + k: v for k, v in _clip("sd1_clip_config.json").items()}
        clip |= {"clip_g.transformer." + k: v for k, v in _clip("clip_config_bigg.json").items()}
        config = comfy.supported_models.SDXL({})
        clip = config.process_clip_state_dict_for_saving(clip)  # the checkpoint's (open_clip) names
        return {k: v.shape for k, v in (unet | clip | _taesd("first_stage_model.", 4)).items()}
    if name == FLUX_MODEL:
        import comfy.ldm.flux.model
        import comfy.ops

        return {k: v.shape for k, v in _meta_state(lambda: comfy.ldm.flux.model.Flux(
            **FLUX_CONFIG, operations=comfy.ops.disable_weight_init)).items()}
    if name == CLIP_L:
        return {k: v.shape for k, v in _clip("sd1_clip_config.json").items()}
    if name == FLUX_VAE:
        return {k: v.shape for k, v in _taesd("", 16).items()}
    raise ValueError(f"unknown workflow fixture {name!r}")


FOLDERS = {SDXL_CHECKPOINT: "checkpoints", FLUX_MODEL: "diffusion_models", CLIP_L: "text_encoders",
           FLUX_VAE: "vae"}


def build(name: str, seed: int = SEED) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.bfloat16 if name == FLUX_MODEL else torch.float16
    out = {}
    for key, shape in sorted(shapes(name).items()):
        value = tiny.fill(key, shape, gen)
        if key.endswith("position_ids"):
            value = torch.arange(shape[-1]).expand(shape)
        out[key] = value if value.dtype == torch.int64 else value.to(dtype)
    return out


def ensure(name: str, models_dir: Path, seed: int = SEED) -> Path:
    """Path of the file under models_dir/<its folder>/, built first if missing."""
    from safetensors.torch import save_file

    path = models_dir / FOLDERS[name] / name
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file(build(name, seed), str(tmp), metadata={"trilora_fixture": f"{name} seed {seed}"})
        tmp.replace(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", type=Path, required=True, help="the ComfyUI folder whose models/ gets the files")
    args = parser.parse_args()
    tiny._comfy(args.comfyui)
    for name in FOLDERS:
        print(ensure(name, args.comfyui / "models"))


if __name__ == "__main__":
    main()
