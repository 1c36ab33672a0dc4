"""What the tools share: the schema shape (node id from the class, the tools' category), the
optional reference model, reading a source (a connected TRILORA or a file), and the tail every
TriLoRA-writing tool ends with: write -> read back -> (TRILORA, filename, info)."""
from __future__ import annotations

import json
import logging
from collections.abc import Callable

import comfy.lora
import folder_paths
from comfy_api.latest import io

from ...trilora_core import (
    TIMESTEP_RANK_KEY,
    TriLoRAFile,
    TriLoRALayer,
    canonicalize,
    is_canonical,
    rank_range,
    read_trilora,
)
from ..file_cache import load_cached
from ..loras_folder import NONE_FILE, relative_name, save_new_file
from ..schema import SAVE_DTYPES

log = logging.getLogger("comfyui-trilora")

CATEGORY = "utils/trilora"
TOOL_ARGS_KEY = "trilora_tool_args"  # JSON: which tool made the file, from what, with which settings
# Metadata that describes the network itself: recomputed for every file written, never copied. The
# noise-level rank's schedule too: a tool re-forms the layers, which mixes the schedule's bands.
_NETWORK_KEYS = {"ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args", "sshs_model_hash",
                 "sshs_legacy_hash", "trilora_format", "modelspec.hash_sha256", TOOL_ARGS_KEY, TIMESTEP_RANK_KEY}


def tool_schema(node: type, display_name: str, description: str, inputs: list, outputs: list,
                output_node: bool = True) -> io.Schema:
    """A tool's schema: its node id is its class name."""
    return io.Schema(node_id=node.__name__, display_name=display_name, category=CATEGORY, is_output_node=output_node,
                     description=description, inputs=inputs, outputs=outputs)


def reference_inputs(what: str) -> list:
    return [
        io.Model.Input(id="model", optional=True,
                       tooltip=f"Optional: the diffusion model the adapter is for. When connected, layer names "
                               f"are rewritten to {what}; unconnected, names stay as in the source (ComfyUI "
                               f"loads either)."),
        io.Clip.Input(id="clip", optional=True,
                      tooltip=f"Optional: the text encoder the adapter is for; text-encoder layer names are "
                              f"rewritten to {what}."),
    ]


def reference_key_map(model, clip) -> tuple[dict, dict] | None:
    """(ComfyUI's own {file prefix: key-map value} map, {weight key: shape}) of the connected
    model / text encoder; None when neither is connected."""
    if model is None and clip is None:
        return None
    key_map: dict = {}
    shapes: dict = {}
    if model is not None:
        comfy.lora.model_lora_keys_unet(model.model, key_map)
        shapes.update((k, tuple(v.shape)) for k, v in model.model.state_dict().items())
    if clip is not None:
        comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
        shapes.update((k, tuple(v.shape)) for k, v in clip.cond_stage_model.state_dict().items())
    return key_map, shapes


def read_source(node: str, trilora_name: str, trilora=None, input_name: str = "trilora_name",
                socket_name: str = "trilora", keep_diffs: bool = False) -> tuple[str, TriLoRAFile]:
    """(label, adapter): the connected TRILORA, else the chosen file (a plain LoRA is converted
    exactly). Neither: ValueError naming both inputs. A file with full-weight diffs (ComfyUI's
    Train LoRA) raises ValueError unless ``keep_diffs``: a TriLoRA file cannot hold them."""
    if trilora is not None:
        if not isinstance(trilora, TriLoRAFile) or not trilora.layers:
            raise ValueError(f"{node}: the {socket_name} input holds no TriLoRA layers")
        return f"{socket_name} (in memory)", trilora
    if trilora_name in (None, "", NONE_FILE):
        raise ValueError(f"{node}: choose a file in {input_name} or connect the {socket_name} input")
    path = folder_paths.get_full_path_or_raise("loras", trilora_name)
    read = load_cached(path)
    if read.diffs and not keep_diffs:
        raise ValueError(f"{node}: {trilora_name} holds {len(read.diffs)} full-weight diffs (first: "
                         f"{sorted(read.diffs)[0]}) beside its low-rank layers, as ComfyUI's Train LoRA writes "
                         "them; a TriLoRA file holds low-rank layers only, so the result would lose them. Apply "
                         "the file with Load TriLoRA or ComfyUI's LoraLoader instead")
    return trilora_name, read


def carried_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """The source's metadata without what describes the old network (recomputed on write)."""
    return {k: v for k, v in metadata.items() if k not in _NETWORK_KEYS}


def tool_args(tool: str, **args) -> dict[str, str]:
    return {TOOL_ARGS_KEY: json.dumps({"tool": tool, **args}, sort_keys=True)}


def write_layers(location: tuple[str, str], layers: dict[str, TriLoRALayer], metadata: dict[str, str],
                 save_dtype: str) -> tuple[str, TriLoRAFile]:
    """Writes canonical layers in ``save_dtype`` as a new file; (name for the loaders, file read back)."""
    dtype = SAVE_DTYPES[save_dtype]
    ready = {}
    for prefix, layer in layers.items():
        layer = layer if is_canonical(layer) else canonicalize(layer)
        ready[prefix] = layer.to(dtype=dtype, device="cpu")
    path = save_new_file(TriLoRAFile(ready, metadata), *location)
    log.info("TriLoRA written to %s", path)
    return relative_name(path), read_trilora(path)


def save_tool_output(location: tuple[str, str], layers: dict[str, TriLoRALayer], metadata: dict[str, str],
               save_dtype: str, describe: Callable[[str, TriLoRAFile], str]) -> io.NodeOutput:
    """The tools' shared tail: ``write_layers``, then (TRILORA read back, filename, info), where
    ``describe(filename, written)`` gives the info text."""
    name, written = write_layers(location, layers, metadata, save_dtype)
    return io.NodeOutput(written, name, describe(name, written))


def rank_text(layers: dict[str, TriLoRALayer]) -> str:
    return f"rank {rank_range(layer.rank for layer in layers.values())}"


def share_text(shares: dict[str, float]) -> str:
    """'X% on average (least: Y% in P)' over layers whose share is defined: a caller leaves out
    layers with nothing to share (an all-zero delta keeps 0 of 0, which is no 100%)."""
    worst = min(shares, key=shares.get)
    return f"{sum(shares.values()) / len(shares):.1%} on average (least: {shares[worst]:.1%} in {worst})"


def alias_text(groups: list[list[str]], what: str = "saved as their sum") -> str:
    return "".join(f"; {' and '.join(g)} adapt one weight: {what}" for g in groups)


def unknown_text(unknown: list[str]) -> str:
    if not unknown:
        return ""
    shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
    return f"; {len(unknown)} layers not in the connected model kept their names: {shown}"
