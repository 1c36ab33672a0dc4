"""Encoding a training dataset once: images through the VAE and captions through CLIP as VAE Encode
and CLIP Text Encode (and ComfyUI 0.33's Make Training Dataset) do, with a cache file
(trilora_core/dataset_cache.py) that keeps them between runs and processes.

An item is found by its content: an image by a digest of its pixels (as the loader made them:
after the bucket resize), a caption by a digest of its text; a changed picture or caption
re-encodes that item only, whatever its name, size or modification time. The file is tied to the
encoders by a digest of their weights (sha256 over every tensor, computed once per loaded model in
a process): for CLIP also its LoRA patches and its clip-skip layer, for the VAE its compute dtype.
Left out: the CLIP tensors ComfyUI lets a checkpoint lack (UNSET_CLIP_KEYS), which then hold
whatever memory they were given, so every process would digest the same CLIP differently.
"""
from __future__ import annotations

import logging
import os
import weakref
from dataclasses import dataclass

import folder_paths
import torch

from ..trilora_core import read_dataset_cache, tensor_digest, text_digest, write_dataset_cache

log = logging.getLogger("comfyui-trilora")

CACHE_FOLDER = "trilora_datasets"  # in ComfyUI's output folder
_DIGESTS: dict[tuple, tuple[weakref.ref, str]] = {}
# comfy/sd.py's load_checkpoint_guess_config tolerates these missing (SD1.5 checkpoints lack the
# text projection and logit scale, which its encoding does not use); ComfyUI leaves them uninitialised.
UNSET_CLIP_KEYS = (".logit_scale", ".transformer.text_projection.weight")


def _memo(module, extra: tuple, compute) -> str:
    """A digest kept per model object (and ``extra`` state) for the life of the object."""
    key = (id(module), *extra)
    held = _DIGESTS.get(key)
    if held is not None and held[0]() is module:
        return held[1]
    digest = compute()
    _DIGESTS[key] = (weakref.ref(module), digest)
    return digest


def _patch_tensors(patches: dict):
    """(name, tensor) of every patch ComfyUI holds for a model (LoRA weights as loaded), with the strengths."""
    for key in sorted(patches, key=str):
        for n, patch in enumerate(patches[key]):
            strength, data = patch[0], patch[1]
            tensors = data if isinstance(data, (list, tuple)) else getattr(data, "weights", (data,))
            for t, tensor in enumerate(tensors):
                if hasattr(tensor, "shape"):
                    yield f"{key}|{n}|{t}|{strength}|{patch[2]}|{type(data).__name__}", tensor


def _label(text: str) -> tuple[str, torch.Tensor]:
    return text, torch.zeros(0)


def vae_digest(vae) -> str:
    """The VAE's weights, its class and compute dtype."""
    model = vae.first_stage_model
    return _memo(model, (str(vae.vae_dtype),), lambda: tensor_digest(
        [_label(f"{type(model).__name__}|{vae.vae_dtype}"), *sorted(model.state_dict().items())]))


def clip_digest(clip) -> str:
    """The text encoders' weights, their classes, the clip-skip layer and the LoRA patches on them."""
    model = clip.cond_stage_model
    extra = (str(clip.patcher.patches_uuid), str(clip.layer_idx))
    return _memo(model, extra, lambda: tensor_digest(
        [_label(f"{type(model).__name__}|{type(clip.tokenizer).__name__}|layer {clip.layer_idx}"),
         *sorted((k, v) for k, v in model.state_dict().items() if not k.endswith(UNSET_CLIP_KEYS)),
         *_patch_tensors(clip.patcher.patches)]))


def cache_path(name: str) -> str:
    """The cache file a ``cache`` input names: an absolute path as given, anything else under
    ComfyUI's output folder (trilora_datasets/); .safetensors is added when missing."""
    name = os.path.expanduser(name.strip())
    if not name.endswith(".safetensors"):
        name += ".safetensors"
    if os.path.isabs(name):
        return name
    root = os.path.join(folder_paths.get_output_directory(), CACHE_FOLDER)
    path = os.path.abspath(os.path.join(root, name))
    if os.path.commonpath([path, os.path.abspath(root)]) != os.path.abspath(root):
        raise ValueError(f"TriLoRAEncodeDataset: cache {name!r} leaves {root}; give a name inside it or an absolute path")
    return path


@dataclass
class Encoded:
    latents: list  # one LATENT {"samples": [1, C, ...]} per image
    conditioning: list  # one CONDITIONING per image
    encoded: int  # images + captions encoded now
    read: int  # images + captions read from the cache file

    def log_cache(self, path: str) -> None:
        """The cache line the node and the command line print (tests read it)."""
        log.info("TriLoRA dataset cache %s: %d items read, %d encoded (an item is an image or a caption)", path,
                 self.read, self.encoded)


def _cached(path: str | None, vae, clip) -> tuple[dict, dict, dict]:
    if path is None:
        return {}, {}, {}
    encoders = {"VAE": vae_digest(vae), "CLIP": clip_digest(clip)}
    if not os.path.exists(path):
        return {}, {}, encoders
    latents, conds = read_dataset_cache(path, encoders)
    return latents, conds, encoders


def encode_dataset(images: list, captions: list[str], vae, clip, path: str | None = None,
                   encode: bool = True) -> Encoded:
    """Each [1, H, W, C] image as a LATENT and each caption as a CONDITIONING, read from the cache
    file at ``path`` where it holds them, else encoded (and the file rewritten with exactly this
    dataset's items). ``encode`` False only reads: an item missing from the file is an error (a
    torchrun rank > 0 reads what rank 0 wrote). Errors name the file."""
    image_keys = [tensor_digest([("image", image)]) for image in images]
    caption_keys = [text_digest(caption) for caption in captions]
    latents, conds, encoders = _cached(path, vae, clip)
    wanted = dict(zip(image_keys, images, strict=True)), dict(zip(caption_keys, captions, strict=True))
    missing = [k for k in wanted[0] if k not in latents], [k for k in wanted[1] if k not in conds]
    if (missing[0] or missing[1]) and not encode:
        raise ValueError(f"TriLoRAEncodeDataset: cache {path} lacks {len(missing[0])} image(s) and {len(missing[1])} "
                         "caption(s) of this dataset; every process must see the same images and the same cache file")
    for key in missing[0]:
        latents[key] = vae.encode(wanted[0][key][:, :, :, :3])
    for key in missing[1]:
        conds[key] = clip.encode_from_tokens_scheduled(clip.tokenize(wanted[1][key]))
    encoded = len(missing[0]) + len(missing[1])
    if path is not None and (encoded or latents.keys() != wanted[0].keys() or conds.keys() != wanted[1].keys()):
        write_dataset_cache(path, {k: latents[k] for k in wanted[0]}, {k: conds[k] for k in wanted[1]}, encoders)
    return Encoded([{"samples": latents[k]} for k in image_keys], [conds[k] for k in caption_keys], encoded,
                   len(wanted[0]) + len(wanted[1]) - encoded)
