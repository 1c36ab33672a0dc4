"""Builds the tiny random models the tests use: one per model family ComfyUI 0.3.75 supports.

They are test fixtures, not models: random weights, so images are noise. Each is the smallest
model ComfyUI detects as its family (FAMILIES below), and the same seed gives the same bytes.

- SD1.5 is a full checkpoint (CheckpointLoaderSimple): the UNet has SD1.5's widths where
  detection looks (model_channels 320, context_dim 768) but one level and one res block (about
  26M parameters), a full-size CLIP-L (ComfyUI builds CLIP-L from a fixed config, so smaller
  fails) and a TAESD-shaped VAE.
- Every other family is a diffusion-model file (UNETLoader; no text encoder or VAE, so tests
  build the conditioning by hand in the family's real widths). Where ComfyUI reads the widths
  off the weights (SDXL, SD3.5, Wan) the file is detected as it is. SDXL's is the largest (50M
  parameters, 100 MB): ComfyUI needs its 320 channels, 2048-wide context and 7 attention blocks.
  Where 0.3.75's detection fixes the width instead (Flux 3072, Qwen-Image 3072, Lumina 2 2304,
  Z-Image 3840: hundreds of MB for one block) the fixture keeps the family's key layout and
  every other width but has one or two attention heads; tests load it with the family's own
  ComfyUI model config and check that the same layout at full width is detected as the family.
- Skipped: Flux.2 and Chroma (0.3.75 detects them, but they fix the width as Flux does and are
  trained far less), the other video families (HunyuanVideo, LTXV, Cosmos, Mochi) and HiDream
  for the same reason, and SD2.x and Stable Cascade, which users no longer train.

    python scripts/make_tiny_checkpoint.py --comfyui .comfyui            # SD1.5, into its checkpoints folder
    python scripts/make_tiny_checkpoint.py --comfyui .comfyui --family all
    python scripts/make_tiny_checkpoint.py --output /tmp/tiny.safetensors --force
    python scripts/make_tiny_checkpoint.py --comfyui .comfyui --drawing  # + the drawing model (minutes, once; make setup)

`--drawing` also builds `trilora-drawing-sd15.safetensors`, the SD1.5 fixture with a VAE that keeps
flat colours and a UNet pretrained from a fixed seed on captioned flat shapes (harness/drawing.py;
`make demo` trains the sample style on it). `make setup` builds it (about 4 minutes on 2 CPU cores,
once). It is rebuilt only when missing or when its build code changed; the random fixture's bytes do
not depend on it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Family:
    """One model family's fixture.

    model_class: the `comfy.supported_models` class ComfyUI detects it as.
    unet_config: the tiny model's config, as that class passes it to the model's constructor.
    objective: what the model predicts, as ComfyUI's model_sampling trains it: "eps", "v" or "flow".
    latent: latent shape of one sample at the smallest size the tests use, (C, H, W) or (C, T, H, W).
    context: (width of the text conditioning, width of its pooled output or None), the real model's.
    full_width: None where ComfyUI detects the file as it is; else the config entries 0.3.75's
        detection fixes (width, heads), which the fixture shrinks.
    extra_keys: scalar tensors the file carries beside the weights (SDXL v-pred's `v_pred` marker).
    checkpoint: a full checkpoint (CheckpointLoaderSimple) rather than a diffusion-model file.
    """
    name: str
    model_class: str
    unet_config: dict
    objective: str
    latent: tuple[int, ...]
    context: tuple[int, int | None]
    full_width: dict | None = None
    extra_keys: tuple[str, ...] = ()
    checkpoint: bool = False

    @property
    def file_name(self) -> str:
        return FILE_NAME if self.name == "sd15" else f"trilora-tiny-{self.name}.safetensors"

    @property
    def folder(self) -> str:
        """folder_paths folder the file goes in (its loader node lists that folder)."""
        return "checkpoints" if self.checkpoint else "diffusion_models"


# SDXL's smallest: ComfyUI matches SDXL and its distillations by model_channels, context_dim,
# adm_in_channels and the per-res-block transformer depths; KOALA-700M's [0, 2, 5] fits in one
# level of three res blocks, no middle block and no decoder attention.
_SDXL = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[3], channel_mult=[1],
    transformer_depth=[0, 2, 5], transformer_depth_output=[0, 0, 0, 0], transformer_depth_middle=-2,
    context_dim=2048, adm_in_channels=2816, num_classes="sequential", use_linear_in_transformer=True,
    use_spatial_transformer=True, legacy=False, use_temporal_attention=False, use_temporal_resblock=False,
    use_checkpoint=False,
)
_WAN = dict(image_model="wan2.1", model_type="t2v", patch_size=(1, 2, 2), dim=128, num_heads=1, ffn_dim=256,
            num_layers=2, freq_dim=256, window_size=(-1, -1), qk_norm=True, cross_attn_norm=True, eps=1e-6)
_LUMINA = dict(image_model="lumina2", patch_size=2, in_channels=16, n_layers=1, qk_norm=True)

FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("sd15", "SD15", UNET_CONFIG, "eps", (4, 8, 8), (768, None), checkpoint=True),
    # KOALA_700M is one of ComfyUI's SDXL classes (a subclass: SDXL's model, text encoders, latents).
    Family("sdxl", "KOALA_700M", _SDXL, "eps", (4, 8, 8), (2048, 1280)),
    Family("sdxl-vpred", "KOALA_700M", _SDXL, "v", (4, 8, 8), (2048, 1280), extra_keys=("v_pred",)),
    # SD3.5 Large's layout (RMS q/k norms); depth 2 makes the width 128 (ComfyUI reads 64 * depth).
    Family("sd3.5", "SD3", dict(
        in_channels=16, out_channels=16, patch_size=2, depth=2, input_size=None, adm_in_channels=2048,
        context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 128}},
        num_patches=256, pos_embed_max_size=16, qk_norm="rms", pos_embed_scaling_factor=None,
        x_block_self_attn_layers=[]), "flow", (16, 8, 8), (4096, 2048)),
    Family("flux-dev", "Flux", dict(
        image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=128,
        mlp_ratio=4.0, num_heads=1, depth=1, depth_single_blocks=1, axes_dim=[16, 56, 56], theta=10000,
        patch_size=2, qkv_bias=True, guidance_embed=True), "flow", (16, 8, 8), (4096, 768),
        full_width=dict(hidden_size=3072, num_heads=24)),
    # Wan 2.1 (and Wan 2.2 A14B, the same network) and Wan 2.2 TI2V-5B: video latents (C, T, H, W).
    Family("wan2.1", "WAN21_T2V", dict(_WAN, in_dim=16, out_dim=16), "flow", (16, 2, 8, 8), (4096, None)),
    Family("wan2.2-5b", "WAN22_T2V", dict(_WAN, in_dim=48, out_dim=48), "flow", (48, 2, 8, 8), (4096, None)),
    # Qwen-Image's latents carry a frame axis, as ComfyUI gives them (its VAE is Wan's).
    Family("qwen-image", "QwenImage", dict(
        image_model="qwen_image", in_channels=64, out_channels=16, num_layers=1, patch_size=2,
        attention_head_dim=128, num_attention_heads=1, joint_attention_dim=3584), "flow", (16, 1, 8, 8), (3584, None),
        full_width=dict(num_attention_heads=24)),
    Family("lumina2", "Lumina2", dict(
        _LUMINA, dim=96, n_heads=1, n_kv_heads=1, cap_feat_dim=2304, axes_dims=[32, 32, 32],
        axes_lens=[300, 512, 512], rope_theta=10000.0, ffn_dim_multiplier=4.0), "flow", (16, 8, 8), (2304, None),
        full_width=dict(dim=2304, n_heads=24, n_kv_heads=8)),
    # Z-Image's time embedding is 256 wide, so is its smallest width: two heads.
    Family("z-image", "ZImage", dict(
        _LUMINA, dim=256, n_heads=2, n_kv_heads=2, cap_feat_dim=2560, axes_dims=[32, 48, 48],
        axes_lens=[1536, 512, 512], rope_theta=256.0, ffn_dim_multiplier=8.0 / 3.0, z_image_modulation=True,
        time_scale=1000.0, pad_tokens_multiple=32), "flow", (16, 8, 8), (2560, None),
        full_width=dict(dim=3840, n_heads=30, n_kv_heads=30)),
)}


def _comfy(comfyui: Path | None = None) -> None:
    """Imports ComfyUI on the CPU (shapes only: never touch a GPU), unless it is imported already."""
    if "comfy.options" in sys.modules:
        return
    if comfyui is not None:
        sys.path.insert(0, str(comfyui.resolve()))
    import comfy.options

    sys.argv = [sys.argv[0], "--cpu"]
    comfy.options.enable_args_parsing()


def model_shapes() -> dict[str, torch.Size]:
    """SD1.5 checkpoint key -> shape, read off ComfyUI's own modules built on the meta device."""
    _comfy()
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
    path = Path(sd1_clip.__file__).with_name("sd1_clip_config.json")
    return json.loads(path.read_text())


def model_config(family: Family, full_width: bool = False):
    """The family's ComfyUI model config (a `comfy.supported_models` instance) for the tiny model,
    or for its full-width layout; fp32 weights, no manual cast."""
    _comfy()
    import comfy.supported_models

    config = dict(family.unet_config, **(family.full_width or {})) if full_width else family.unet_config
    model_config = getattr(comfy.supported_models, family.model_class)(config)
    model_config.set_inference_dtype(torch.float32, None)
    return model_config


def diffusion_model_shapes(family: Family, full_width: bool = False) -> dict[str, torch.Size]:
    """Diffusion-model file key -> shape (no prefix, as UNETLoader files have them), read off the
    model ComfyUI builds from the family's config on the meta device."""
    model = model_config(family, full_width).get_model({}, "", device="meta")
    return {k: v.shape for k, v in model.diffusion_model.state_dict().items()}


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


def build(seed: int = SEED, family: str = "sd15") -> dict[str, torch.Tensor]:
    """The fixture's tensors (fp16, sorted keys) for that family and seed."""
    fam = FAMILIES[family]
    shapes = model_shapes() if fam.checkpoint else diffusion_model_shapes(fam)
    generator = torch.Generator().manual_seed(seed)
    tensors = {k: fill(k, shape, generator).to(torch.float16).contiguous() for k, shape in sorted(shapes.items())}
    tensors.update({k: torch.tensor(1.0) for k in fam.extra_keys})
    return tensors


def description(family: str, seed: int = SEED) -> str:
    """The file's one metadata entry. Other families' carry a digest of their spec, so a cached
    file built from an older table is seen as stale."""
    text = f"comfyui-trilora test fixture, random weights, seed {seed}"
    fam = FAMILIES[family]
    if fam.checkpoint:
        return text
    digest = hashlib.sha256(repr(fam).encode()).hexdigest()[:12]
    return f"{text}, family {family} ({fam.model_class}), spec {digest}"


def write(path: Path, seed: int = SEED, family: str = "sd15") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = build(seed, family)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; a model file is for every user
    try:
        # One metadata entry only: safetensors writes a map's entries in no fixed order.
        save_file(tensors, tmp, metadata={"description": description(family, seed)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def is_current(path: Path, family: str, seed: int = SEED) -> bool:
    """Whether the file at path is this family's fixture as the table builds it now."""
    from safetensors import safe_open

    if not path.exists():
        return False
    with safe_open(str(path), "pt") as f:
        return (f.metadata() or {}).get("description") == description(family, seed)


def ensure(family: str, folder: Path | None = None, seed: int = SEED) -> Path:
    """Path of the family's fixture, built first if missing or stale. The folder defaults to the
    running ComfyUI's own folder for its loader (folder_paths)."""
    fam = FAMILIES[family]
    if folder is None:
        import folder_paths

        folder = Path(folder_paths.get_folder_paths(fam.folder)[0])
    path = folder / fam.file_name
    if not is_current(path, family, seed):
        write(path, seed, family)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui", type=Path, default=Path(os.environ.get("COMFYUI_DIR", ".comfyui")),
                        help="ComfyUI folder (its modules give the shapes; default output is its models folders)")
    parser.add_argument("--family", default="sd15", choices=[*FAMILIES, "all"],
                        help="which fixture to build (default: the SD1.5 checkpoint)")
    parser.add_argument("--output", type=Path, help="file to write instead (one family)")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--force", action="store_true", help="write even if the file exists")
    parser.add_argument("--drawing", action="store_true",
                        help="also build the demo's drawing model from the SD1.5 fixture (minutes, once)")
    args = parser.parse_args()

    _comfy(args.comfyui)
    families = list(FAMILIES) if args.family == "all" else [args.family]
    if args.output and len(families) > 1:
        parser.error("--output takes one family")
    for family in families:
        fam = FAMILIES[family]
        path = args.output or args.comfyui / "models" / fam.folder / fam.file_name
        if path.exists() and not args.force:
            continue
        write(path, args.seed, family)
        print(f"[setup] wrote {path}")
    if args.drawing:
        write_drawing(args.comfyui / "models" / "checkpoints")


def write_drawing(folder: Path) -> Path:
    """The drawing model's path beside the SD1.5 fixture it is made from; built first unless current."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from harness import drawing

    path = folder / drawing.FILE_NAME
    if drawing.is_current(path):
        return path
    fixture = folder / FILE_NAME
    if not is_current(fixture, "sd15"):
        write(fixture, SEED, "sd15")
    print(f"[setup] pretraining the demo's drawing model into {path} (once; a few minutes) ...", flush=True)
    start = time.perf_counter()
    info = drawing.write(path, fixture, log=lambda text: print(f"[setup]   {text}", flush=True))
    print(f"[setup] wrote {path} in {time.perf_counter() - start:.0f} s: {json.dumps(info)}", flush=True)
    return path


if __name__ == "__main__":
    main()
