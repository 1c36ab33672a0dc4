"""Writing a TriLoRA as a LoRA/LoCon file with exactly the same weight change: kohya's
(``lora_up`` / ``lora_down`` / ``alpha``, ``networks.lora`` metadata) for ComfyUI's stock LoRA
loader, kohya's sd-scripts and other tools, or PEFT's factor names (``lora_B`` / ``lora_A``, no
alpha: scale 1, the convention diffusers and PEFT read) under diffusers module names: the export
beside ``write_trilora``. Which names the layers get is key_map's business."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import torch
from torch import Tensor

from .convert import trilora_to_lora
from .fileformat import HASH_KEY
from .formatting import format_number
from .layer import TriLoRALayer
from .safetensors_io import atomic_write_bytes, data_hash, serialize
from .suffixes import ALPHA_PART, LORA_NAMINGS, LoraNaming

KOHYA = LORA_NAMINGS[0]  # .lora_up.weight / .lora_down.weight, with .alpha
PEFT = LORA_NAMINGS[1]  # .lora_B.weight / .lora_A.weight, no alpha (scale 1)


def unit_scale(layer: TriLoRALayer) -> TriLoRALayer:
    """The same delta with alpha = rank (scale 1), as a file without alpha keys means it."""
    s = layer.s.detach().to(torch.float64) * (layer.alpha / layer.rank)
    return TriLoRALayer(layer.u, s.to(layer.s.dtype), layer.vt, float(layer.rank))


def lora_tensors(layers: Mapping[str, TriLoRALayer], dtype: torch.dtype,
                 naming: LoraNaming = KOHYA) -> dict[str, Tensor]:
    """LoRA/LoCon tensors with the same delta W: sqrt(s) folded into each side (``dtype``) under
    ``naming``'s factor names; with KOHYA alpha as a float32 scalar, with PEFT none (alpha folded
    into the factors). Raises ValueError naming the first tensor ``dtype`` cannot hold."""
    tensors = {}
    for prefix, layer in sorted(layers.items()):
        if naming is PEFT:
            layer = unit_scale(layer.to(dtype=torch.float32, device="cpu"))
        up, down, alpha = trilora_to_lora(layer.to(dtype=torch.float32, device="cpu"), fold="split")
        for key, tensor in ((f"{prefix}{naming.up}", up), (f"{prefix}{naming.down}", down)):
            tensor = tensor.to(dtype).contiguous()
            if not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"{key} does not fit in {str(dtype).removeprefix('torch.')}; save it as fp32")
            tensors[key] = tensor
        if naming is not PEFT:
            tensors[f"{prefix}.{ALPHA_PART}"] = torch.tensor(float(alpha), dtype=torch.float32)
    return tensors


def lora_metadata(layers: Mapping[str, TriLoRALayer], carried: Mapping[str, str], output_name: str,
                  comment: str) -> dict[str, str]:
    """``carried`` plus kohya's network metadata: networks.lora, the largest rank as
    ss_network_dim with its layer's alpha, LoCon's conv_dim / conv_alpha when a layer is a
    spatial conv, and a ``.../lora`` architecture where the source's was ``.../trilora``."""
    ranks = {p: layer.rank for p, layer in layers.items()}
    top = max(ranks.values())
    alpha = next(layers[p].alpha for p in sorted(layers) if ranks[p] == top)
    meta = dict(carried)
    meta.update({
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(top),
        "ss_network_alpha": format_number(alpha),
        "ss_output_name": output_name,
        "ss_training_comment": comment,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.title": output_name,
    })
    conv = {p: layer for p, layer in layers.items() if any(k != 1 for k in layer.vt.shape[2:])}
    if conv:  # kohya's LoCon: 3x3 convs need conv_dim / conv_alpha in the network arguments
        conv_top = max(layer.rank for layer in conv.values())
        conv_alpha = next(conv[p].alpha for p in sorted(conv) if conv[p].rank == conv_top)
        meta["ss_network_args"] = json.dumps({"conv_dim": str(conv_top), "conv_alpha": format_number(conv_alpha)})
    arch = meta.get("modelspec.architecture")
    if arch and arch.endswith("/trilora"):
        meta["modelspec.architecture"] = arch.removesuffix("/trilora") + "/lora"
    return meta


def lora_file_bytes(layers: Mapping[str, TriLoRALayer], metadata: Mapping[str, str],
                    dtype: torch.dtype = torch.float32, naming: LoraNaming = KOHYA) -> bytes:
    """The safetensors bytes of a LoRA file: ``lora_tensors`` in ``dtype`` and ``naming``,
    ``metadata`` as given (e.g. from ``lora_metadata``) plus kohya's sshs_model_hash of the tensor
    data. Raises ValueError as ``lora_tensors`` does, before anything is written."""
    tensors = lora_tensors(layers, dtype, naming)
    meta = dict(metadata)
    meta[HASH_KEY] = data_hash(serialize(tensors, meta))
    return serialize(tensors, meta)


def write_lora(path: str | os.PathLike[str], layers: Mapping[str, TriLoRALayer], metadata: Mapping[str, str],
               dtype: torch.dtype = torch.float32) -> str:
    """Writes ``lora_file_bytes`` to ``path`` atomically; returns the path."""
    atomic_write_bytes(os.fspath(path), lora_file_bytes(layers, metadata, dtype))
    return os.fspath(path)
