"""The encoded-dataset cache file: latents and text conditionings keyed by their inputs' content,
with the identity of the encoders that made them, in one safetensors file.

Layout (all metadata values are strings, as safetensors requires):

- ``trilora_dataset_cache``: the format version ("1").
- ``encoders``: JSON {name: digest} of the encoders (e.g. {"VAE": ..., "CLIP": ...}); a reader
  that expects other digests refuses the file.
- ``layout``: JSON {"latents": [key ...], "conds": {key: [entry ...]}}; an entry is {option:
  {"tensor": name} | {"value": JSON value}} for the options of a conditioning entry (ComfyUI's
  [cond, {"pooled_output": ...}]), its cond tensor under ``cond.<key>.<n>``.
- ``data_sha256``: sha256 of the tensor data, so an edited or damaged file is refused.

Tensors: ``latent.<key>`` [1, C, ...] per image, ``cond.<key>.<n>`` and ``cond.<key>.<n>.<option>``.
Keys are content digests (``tensor_digest``, ``text_digest``): a changed image or caption gets a
new key, whatever its file name, size or modification time.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable

import torch
from torch import Tensor

from .errors import TriLoRAFileError
from .safetensors_io import SafetensorsReader, atomic_write_bytes, data_hash, file_content_hash, serialize

FORMAT_KEY, VERSION = "trilora_dataset_cache", "1"
_JSON_TYPES = (bool, int, float, str, type(None))


def tensor_digest(tensors: Iterable[tuple[str, Tensor]]) -> str:
    """sha256 over (name, dtype, shape, bytes) of each tensor, in the order given: the same
    tensors give the same digest on any device; any changed value, shape or dtype another."""
    digest = hashlib.sha256()
    for name, tensor in tensors:
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy() if flat.numel() else b"")  # the buffer, not a copy
    return digest.hexdigest()


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _entry_tensors(key: str, n: int, entry) -> tuple[dict[str, Tensor], dict]:
    cond, options = entry
    tensors = {f"cond.{key}.{n}": cond}
    layout = {}
    for option, value in options.items():
        if isinstance(value, Tensor):
            tensors[f"cond.{key}.{n}.{option}"] = value
            layout[option] = {"tensor": f"cond.{key}.{n}.{option}"}
        elif isinstance(value, _JSON_TYPES):
            layout[option] = {"value": value}
        else:
            raise ValueError(f"the conditioning option {option!r} ({type(value).__name__}) cannot be cached; "
                             "encode without a cache file")
    return tensors, layout


def write_dataset_cache(path: str, latents: dict[str, Tensor], conds: dict[str, list], encoders: dict[str, str]) -> None:
    """Writes the cache atomically: ``latents`` {image key: [1, C, ...]}, ``conds`` {caption key:
    CONDITIONING (a list of [cond tensor, options])}. Raises ValueError for an option that is
    neither a tensor nor a JSON value."""
    tensors = {f"latent.{key}": latent for key, latent in latents.items()}
    layout: dict = {"latents": sorted(latents), "conds": {}}
    for key, cond in conds.items():
        entries = []
        for n, entry in enumerate(cond):
            entry_tensors, entry_layout = _entry_tensors(key, n, entry)
            tensors.update(entry_tensors)
            entries.append(entry_layout)
        layout["conds"][key] = entries
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    metadata = {FORMAT_KEY: VERSION, "encoders": json.dumps(encoders, sort_keys=True),
                "layout": json.dumps(layout, sort_keys=True)}
    metadata["data_sha256"] = data_hash(serialize(tensors, metadata))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_bytes(path, serialize(tensors, metadata))


def _metadata(path: str, reader: SafetensorsReader, encoders: dict[str, str]) -> dict:
    meta = reader.metadata()
    if FORMAT_KEY not in meta:
        raise TriLoRAFileError(path, None, "not a TriLoRA dataset cache (a safetensors file of another kind, e.g. a "
                                           "model or LoRA); give the cache another name")
    if meta[FORMAT_KEY] != VERSION:
        raise TriLoRAFileError(path, None, f"a dataset cache of format {meta[FORMAT_KEY]!r}, this pack reads "
                                           f"{VERSION!r}; delete it to encode again")
    try:
        got, layout = json.loads(meta["encoders"]), json.loads(meta["layout"])
    except (KeyError, ValueError) as err:
        raise TriLoRAFileError(path, None, f"a damaged dataset cache ({err}); delete it to encode again") from None
    for name, digest in encoders.items():
        if got.get(name) != digest:
            raise TriLoRAFileError(path, None, f"encoded with another {name} (its weights' digest "
                                               f"{str(got.get(name))[:12]}, this one's {digest[:12]}); delete the "
                                               "file to encode again, or give another cache name")
    if file_content_hash(path) != meta.get("data_sha256"):
        raise TriLoRAFileError(path, None, "edited or damaged: its tensor data is not what was written "
                                           "(data_sha256 differs); delete it to encode again")
    return layout


def read_dataset_cache(path: str, encoders: dict[str, str]) -> tuple[dict[str, Tensor], dict[str, list]]:
    """({image key: latent}, {caption key: CONDITIONING}) from a cache written for ``encoders``.
    Raises TriLoRAFileError naming the file when it is no dataset cache, was made by other
    encoders, or was edited or damaged."""
    with SafetensorsReader(path) as reader:
        layout = _metadata(path, reader, encoders)
        try:
            latents = {key: reader.tensor(f"latent.{key}") for key in layout["latents"]}
            conds = {key: [[reader.tensor(f"cond.{key}.{n}"),
                            {option: reader.tensor(v["tensor"]) if "tensor" in v else v["value"]
                             for option, v in entry.items()}]
                           for n, entry in enumerate(entries)]
                     for key, entries in layout["conds"].items()}
        except (KeyError, TypeError, AttributeError) as err:
            raise TriLoRAFileError(path, None, f"a damaged dataset cache (its layout names {err}); delete it to "
                                               "encode again") from None
    return latents, conds
