"""What the command line trains on: one checkpoint file (CheckpointLoaderSimple), or a diffusion
model, its text encoders and VAE as separate files (Load Diffusion Model, Load CLIP / DualCLIPLoader
/ TripleCLIPLoader, Load VAE), as Flux, SD3.5, Wan and most newer models ship. ComfyUI's own loader
nodes load them, so a file loads exactly as in a graph; `weight_dtype` is UNETLoader's (float8
bases) and applies to a checkpoint's diffusion model too."""
from __future__ import annotations

import os

import comfy.sd
import folder_paths
import torch

import nodes as comfy_nodes  # ComfyUI's nodes.py

WEIGHT_DTYPES = {"default": {}, "fp8_e4m3fn": {"dtype": torch.float8_e4m3fn},
                 "fp8_e4m3fn_fast": {"dtype": torch.float8_e4m3fn, "fp8_optimizations": True},
                 "fp8_e5m2": {"dtype": torch.float8_e5m2}}  # UNETLoader's choices and model options
CLIP_LOADERS = {1: "CLIPLoader", 2: "DualCLIPLoader", 3: "TripleCLIPLoader"}  # ids: TripleCLIPLoader is an extra node


def clip_loader(files: int):
    """ComfyUI's loader node class for this many text encoder files."""
    return comfy_nodes.NODE_CLASS_MAPPINGS[CLIP_LOADERS[files]]


def _clip_types() -> list[str]:
    """Every `type` that ComfyUI's CLIPLoader or DualCLIPLoader takes, in their order."""
    types: list[str] = []
    for loader in (clip_loader(1), clip_loader(2)):
        types += [t for t in loader.INPUT_TYPES()["required"]["type"][0] if t not in types]
    return types


def options(option) -> list:
    """The command line's model options, built with its Option class."""
    return [
        option("checkpoint", "STRING", {"default": "", "tooltip": "The model to train for: a checkpoint file in "
               "ComfyUI's checkpoints folder, or a path to one. Empty: give unet, clip and vae instead."}),
        option("unet", "STRING", {"default": "", "tooltip": "A diffusion model file (ComfyUI's diffusion_models "
               "folder, or a path), as Load Diffusion Model loads it; needs clip and vae."}),
        option("weight_dtype", "COMBO", {"default": "default", "options": list(WEIGHT_DTYPES), "tooltip": "How the "
               "diffusion model's weights are stored, as Load Diffusion Model's weight_dtype: fp8_e4m3fn trains on "
               "a float8 base."}),
        option("clip", "STRING", {"default": "", "tooltip": "With unet: the text encoder file(s) (ComfyUI's "
               "text_encoders folder, or paths), comma-separated: one as Load CLIP, two as DualCLIPLoader, three "
               "as TripleCLIPLoader loads them."}),
        option("clip_type", "COMBO", {"default": "stable_diffusion", "options": _clip_types(), "tooltip": "With "
               "clip: the model family its text encoders are for, as Load CLIP's and DualCLIPLoader's type (flux "
               "for Flux's CLIP-L + T5, sdxl for CLIP-L + CLIP-G)."}),
        option("vae", "STRING", {"default": "", "tooltip": "With unet: the VAE file (ComfyUI's vae folder, or a "
               "path), as Load VAE loads it."}),
    ]


def _file_in(folder: str, value: str, option: str, error) -> str:
    """A name in ComfyUI's ``folder``, or a path (its folder is registered there first)."""
    if os.path.isfile(value):
        folder_paths.add_model_folder_path(folder, os.path.dirname(os.path.abspath(value)), is_default=True)
        return os.path.basename(value)
    if folder_paths.get_full_path(folder, value) is None:
        raise error(f"{option} {value!r}: no such file, and not in ComfyUI's {folder} folder "
                    f"({', '.join(folder_paths.get_folder_paths(folder))})")
    return value


def resolve_files(values: dict, error) -> dict:
    """{option: file name as ComfyUI's loaders take it}; raises ``error`` naming the option when
    the choice is incomplete or a file is missing, before anything loads."""
    checkpoint, unet = values["checkpoint"].strip(), values["unet"].strip()
    split = {k: values[k].strip() for k in ("clip", "vae")}
    if bool(checkpoint) == bool(unet):
        raise error("give checkpoint (one file), or unet with clip and vae (separate files), not "
                    + ("both" if checkpoint else "neither"))
    if checkpoint:
        extra = [k for k, v in split.items() if v]
        if extra:
            raise error(f"{extra[0]} is for a unet; a checkpoint holds its own text encoder and VAE")
        return {"checkpoint": _file_in("checkpoints", checkpoint, "checkpoint", error)}
    missing = [k for k, v in split.items() if not v]
    if missing:
        raise error(f"unet needs {' and '.join(missing)} too (the text encoder and VAE files)")
    clips = [c.strip() for c in split["clip"].split(",") if c.strip()]
    if len(clips) > 3:
        raise error(f"clip: {len(clips)} files; ComfyUI's loaders take one, two or three")
    if len(clips) < 3:
        types = clip_loader(len(clips)).INPUT_TYPES()["required"]["type"][0]
        if values["clip_type"] not in types:
            raise error(f"clip_type = {values['clip_type']!r}: {CLIP_LOADERS[len(clips)]}, which loads "
                        f"{len(clips)} text encoder file{'s' if len(clips) > 1 else ''}, takes one of {', '.join(types)}")
    return {"unet": _file_in("diffusion_models", unet, "unet", error),
            "clip": [_file_in("text_encoders", c, "clip", error) for c in clips],
            "vae": _file_in("vae", split["vae"], "vae", error)}


def load(values: dict, files: dict):
    """(MODEL, CLIP, VAE) through ComfyUI's loader nodes; call under inference mode."""
    model_options = WEIGHT_DTYPES[values["weight_dtype"]]
    if "checkpoint" in files:
        path = folder_paths.get_full_path_or_raise("checkpoints", files["checkpoint"])
        return comfy.sd.load_checkpoint_guess_config(  # CheckpointLoaderSimple, with UNETLoader's weight dtype
            path, output_vae=True, output_clip=True, embedding_directory=folder_paths.get_folder_paths("embeddings"),
            model_options=dict(model_options))[:3]
    model = comfy_nodes.UNETLoader().load_unet(files["unet"], values["weight_dtype"])[0]
    clips = files["clip"]
    loader = clip_loader(len(clips))()
    if len(clips) == 1:
        clip = loader.load_clip(clips[0], values["clip_type"])[0]
    elif len(clips) == 2:
        clip = loader.load_clip(*clips, values["clip_type"])[0]
    else:
        clip = loader.load_clip(*clips)[0]
    vae = comfy_nodes.VAELoader().load_vae(files["vae"])[0]
    return model, clip, vae
