"""Tools made possible by TriLoRA's exact SVD form, each writing a new file into the loras folder:
convert any LoRA/LoCon to TriLoRA (exactly), export a TriLoRA as a kohya LoRA (exactly), extract a
TriLoRA from two checkpoints, resize one by rank or energy, merge several with weights.

Files are named by filename_prefix inside the first loras folder with a counter, never replacing
a file (nodes/save.py's rules); the TriLoRA ones come back read from disk as TRILORA."""
from __future__ import annotations

import json
import logging
from collections.abc import Callable

import comfy.lora
import comfy.model_management
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io

from ..trilora_core import (
    SVD_METHODS,
    TriLoRAFile,
    TriLoRALayer,
    alias_groups,
    canonicalize,
    extract_layer,
    fold_aliases,
    is_canonical,
    kept_energy,
    merge_files,
    prefix_for_weight,
    prefixes_by_weight,
    read_trilora,
    spectrum,
    trilora_to_lora,
    truncate,
)
from ..trilora_core.keys import layers_by_weight
from ..trilora_core.safetensors_io import atomic_write_bytes, data_hash, serialize
from . import spectrum as spectrum_view
from .file_cache import load_cached
from .loras_folder import NONE_FILE, OptionalLorasFileNode, check_names, file_choice, files_fingerprint
from .save import TRILORA, place_new_file, prefix_location, relative_name, save_new_file
from .train import base_model_metadata

log = logging.getLogger("comfyui-trilora")

CATEGORY = "utils/trilora"
TOOL_ARGS_KEY = "trilora_tool_args"  # JSON: which tool made the file, from what, with which settings
SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MERGE_SLOTS = 4
# Metadata that describes the network itself: recomputed for every file written, never copied.
_NETWORK_KEYS = {"ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args", "sshs_model_hash",
                 "sshs_legacy_hash", "trilora_format", "modelspec.hash_sha256", TOOL_ARGS_KEY}


# --------------------------------------------------------------------------- shared inputs


def optional_trilora_input(tooltip: str, input_id: str = "trilora"):
    return TRILORA.Input(id=input_id, optional=True, tooltip=tooltip)


def prefix_input(default: str) -> io.String.Input:
    return io.String.Input(
        id="filename_prefix", default=default,
        tooltip="Name of the new file inside your loras folder ('/' makes subfolders). A counter is added "
                "(name_00001_.safetensors), so no file is ever replaced.")


def dtype_input(default: str, why: str) -> io.Combo.Input:
    return io.Combo.Input(id="save_dtype", options=list(SAVE_DTYPES), default=default,
                          tooltip=f"Precision of the saved factors. {why}")


EXACT_DTYPE = "fp32 keeps the result exact; fp16/bf16 halve the file and round each factor."


def max_rank_input(tooltip: str, default: int = 0) -> io.Int.Input:
    return io.Int.Input(id="max_rank", default=default, min=0, max=4096, tooltip=tooltip)


def energy_input(tooltip: str) -> io.Float.Input:
    return io.Float.Input(id="energy", default=1.0, min=0.01, max=1.0, step=0.01, tooltip=tooltip)


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


def filename_output() -> io.String.Output:
    # One new object per schema: newer ComfyUI writes ids into outputs in place.
    return io.String.Output(id="filename", display_name="filename", tooltip="The new file's name as the loaders "
                            "list it (relative to the loras folder).")


def trilora_output():
    return TRILORA.Output(id="TRILORA", display_name="TRILORA", tooltip="The TriLoRA just written, read back from "
                          "the file: connect Apply TriLoRA, TriLoRA Spectrum or another tool.")


def info_output(what: str) -> io.String.Output:
    return io.String.Output(id="info", display_name="info", tooltip=what)


# --------------------------------------------------------------------------- sources


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


# --------------------------------------------------------------------------- writing


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


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _rank_text(layers: dict[str, TriLoRALayer]) -> str:
    ranks = [layer.rank for layer in layers.values()]
    return f"rank {min(ranks)}" if min(ranks) == max(ranks) else f"rank {min(ranks)}-{max(ranks)}"


def _energy(layer: TriLoRALayer) -> float:
    """||delta W||_F^2 from the singular values (cheap: no full-size delta is formed)."""
    return float((spectrum(layer).double() ** 2).sum())


# --------------------------------------------------------------------------- layer names


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


def kohya_prefixes(key_map: dict) -> dict[str, str]:
    """{weight key: name kohya's sd-scripts use}: diffusers-style lora_unet_down_blocks_... for the
    UNet where ComfyUI knows one, lora_te_/lora_te1_/lora_te2_ for text encoders."""
    chosen = prefixes_by_weight(key_map)
    diffusers: dict[str, str] = {}
    for alias, target in key_map.items():
        if not isinstance(target, str) or not alias.startswith("lora_unet_"):
            continue
        mechanical = "lora_unet_" + target.removeprefix("diffusion_model.").removesuffix(".weight").replace(".", "_")
        if alias != mechanical and (target not in diffusers or alias < diffusers[target]):
            diffusers[target] = alias
    return {weight: diffusers.get(weight, prefix) for weight, prefix in chosen.items()}


def rename_layers(node: str, layers: dict[str, TriLoRALayer], reference: tuple[dict, dict] | None,
                  names: dict[str, str]) -> tuple[dict[str, TriLoRALayer], list[str], list[list[str]]]:
    """(layers under the chosen names, prefixes the model does not know (kept as they are), groups
    of prefixes that adapt one weight). With a reference model each prefix is resolved by its key
    map (trilora_core.keys.layers_by_weight); without, aliases are told by their names alone.
    Entries on one weight become one layer with their summed delta (exact)."""
    if reference is None:
        return fold_aliases(layers), [], alias_groups(layers)
    key_map, shapes = reference
    try:
        resolved = layers_by_weight(layers, key_map, shapes)
    except ValueError as err:
        raise ValueError(f"{node}: {err}; was the adapter made for another base model?") from None
    out = {names.get(weight, prefix_for_weight(weight, key_map)): layer for weight, layer in resolved.layers.items()}
    for prefix in resolved.unknown:
        if prefix in out:
            raise ValueError(f"{node}: layer {prefix} is not in the connected model, and another layer is saved "
                             "under that name; connect the model the adapter was made for")
        out[prefix] = layers[prefix]
    return dict(sorted(out.items())), resolved.unknown, list(resolved.aliases().values())


def _alias_text(groups: list[list[str]]) -> str:
    return "".join(f"; {' and '.join(g)} adapt one weight: saved as their sum" for g in groups)


def _unknown_text(unknown: list[str]) -> str:
    if not unknown:
        return ""
    shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
    return f"; {len(unknown)} layers not in the connected model kept their names: {shown}"


# --------------------------------------------------------------------------- convert


class TriLoRAConvertLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TriLoRAConvertLoRA",
            display_name="Convert LoRA to TriLoRA",
            category=CATEGORY,
            is_output_node=True,
            description="Converts a LoRA/LoCon file (kohya, ComfyUI-trained, diffusers/PEFT names) into a "
                        "canonical TriLoRA file with exactly the same weight change, so any LoRA gains optimal "
                        "rank truncation and a spectrum.",
            inputs=[
                file_choice("lora_name", "The LoRA/LoCon file to convert, from your loras folder."),
                prefix_input("trilora/converted"),
                dtype_input("fp32", EXACT_DTYPE),
                *reference_inputs("the pack's kohya-style names (lora_unet_..., lora_te_...)"),
            ],
            outputs=[trilora_output(), filename_output(),
                     info_output("How many layers were converted, their ranks, and any layer names the "
                                 "connected model does not know.")],
        )

    @classmethod
    def validate_inputs(cls, lora_name=None):
        return check_names(lora_name, none=False)

    @classmethod
    def fingerprint_inputs(cls, lora_name, **_):
        return files_fingerprint(lora_name)

    @classmethod
    def execute(cls, lora_name, filename_prefix, save_dtype, model=None, clip=None):
        node = "TriLoRAConvertLoRA"
        location = prefix_location(filename_prefix, node)
        _, source = read_source(node, lora_name, None, "lora_name")
        reference = reference_key_map(model, clip)
        names = prefixes_by_weight(reference[0]) if reference is not None else {}
        layers, unknown, aliases = rename_layers(node, source.layers, reference, names)
        metadata = {**carried_metadata(source.metadata),
                    **tool_args("convert", source=lora_name, renamed=reference is not None)}
        name, written = write_layers(location, layers, metadata, save_dtype)
        info = (f"converted {lora_name} exactly: {len(layers)} layers, {_rank_text(written.layers)}; "
                f"saved as {name}{_alias_text(aliases)}{_unknown_text(unknown)}")
        return io.NodeOutput(written, name, info)


# --------------------------------------------------------------------------- export


def lora_tensors(layers: dict[str, TriLoRALayer], dtype: torch.dtype, node: str) -> dict[str, torch.Tensor]:
    """kohya LoRA/LoCon tensors with the same delta W: sqrt(s) folded into each side."""
    tensors = {}
    for prefix, layer in sorted(layers.items()):
        up, down, alpha = trilora_to_lora(layer.to(dtype=torch.float32, device="cpu"), fold="split")
        for key, tensor in ((f"{prefix}.lora_up.weight", up), (f"{prefix}.lora_down.weight", down)):
            tensor = tensor.to(dtype).contiguous()
            if not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"{node}: {key} does not fit in {str(dtype).removeprefix('torch.')}; "
                                 "save it as fp32")
            tensors[key] = tensor
        tensors[f"{prefix}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return tensors


def kohya_metadata(layers: dict[str, TriLoRALayer], carried: dict[str, str], output_name: str,
                   comment: str) -> dict[str, str]:
    ranks = {p: layer.rank for p, layer in layers.items()}
    top = max(ranks.values())
    alpha = next(layers[p].alpha for p in sorted(layers) if ranks[p] == top)
    meta = dict(carried)
    meta.update({
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(top),
        "ss_network_alpha": _number(alpha),
        "ss_output_name": output_name,
        "ss_training_comment": comment,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.title": output_name,
    })
    conv = {p: layer for p, layer in layers.items() if any(k != 1 for k in layer.vt.shape[2:])}
    if conv:  # kohya's LoCon: 3x3 convs need conv_dim / conv_alpha in the network arguments
        conv_top = max(layer.rank for layer in conv.values())
        conv_alpha = next(conv[p].alpha for p in sorted(conv) if conv[p].rank == conv_top)
        meta["ss_network_args"] = json.dumps({"conv_dim": str(conv_top), "conv_alpha": _number(conv_alpha)})
    arch = meta.get("modelspec.architecture")
    if arch and arch.endswith("/trilora"):
        meta["modelspec.architecture"] = arch.removesuffix("/trilora") + "/lora"
    return meta


class TriLoRAExportLoRA(OptionalLorasFileNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TriLoRAExportLoRA",
            display_name="Export TriLoRA as LoRA (kohya)",
            category=CATEGORY,
            is_output_node=True,
            description="Writes a TriLoRA as a standard kohya LoRA/LoCon file (lora_up/lora_down/alpha, "
                        "networks.lora metadata) with exactly the same weight change, for ComfyUI's stock "
                        "Load LoRA, kohya's sd-scripts and other tools.",
            inputs=[
                file_choice("trilora_name", "The TriLoRA file to export, from your loras folder. Ignored when "
                            "the trilora input is connected.", none=True),
                prefix_input("trilora/lora"),
                dtype_input("fp32", EXACT_DTYPE),
                optional_trilora_input("An in-memory TriLoRA to export instead of a file."),
                *reference_inputs("kohya sd-scripts' names (lora_unet_down_blocks_..., lora_te_...)"),
            ],
            outputs=[filename_output(),
                     info_output("How many layers were written, their ranks, and the naming used.")],
        )

    @classmethod
    def execute(cls, trilora_name, filename_prefix, save_dtype, trilora=None, model=None, clip=None):
        node = "TriLoRAExportLoRA"
        folder, base = prefix_location(filename_prefix, node)
        label, source = read_source(node, trilora_name, trilora)
        reference = reference_key_map(model, clip)
        names = kohya_prefixes(reference[0]) if reference is not None else {}
        layers, unknown, aliases = rename_layers(node, source.layers, reference, names)
        tensors = lora_tensors(layers, SAVE_DTYPES[save_dtype], node)
        meta = kohya_metadata(layers, carried_metadata(source.metadata), base,
                              f"exported from the TriLoRA {label} by comfyui-trilora (same weight change)")
        meta.update(tool_args("export", source=label, renamed=reference is not None))
        meta["sshs_model_hash"] = data_hash(serialize(tensors, meta))
        data = serialize(tensors, meta)
        path = place_new_file(lambda tmp: atomic_write_bytes(tmp, data), folder, base)
        name = relative_name(path)
        log.info("TriLoRA %s exported as a LoRA to %s", label, path)
        naming = "kohya names from the connected model" if reference is not None else "names as in the source"
        info = (f"exported {label} as a kohya LoRA: {len(layers)} layers, {_rank_text(layers)} ({naming}); "
                f"saved as {name}{_alias_text(aliases)}{_unknown_text(unknown)}")
        return io.NodeOutput(name, info)


# --------------------------------------------------------------------------- extract


def _weight_keys(entries: dict) -> list[str]:
    keys = []
    for key, entry in entries.items():
        weight = entry[0][0]
        if key.endswith(".weight") and weight.ndim >= 2 and weight.is_floating_point():
            keys.append(key)
    return sorted(keys)


def _unchanged(a: list, b: list) -> bool:
    """Both entries are the same stored tensor with the same patches: their difference is 0."""
    return len(a) == len(b) and a[0][0] is b[0][0] and all(x is y for x, y in zip(a[1:], b[1:], strict=True))


def effective_weight(entry: list, key: str, device, originals: dict) -> torch.Tensor:
    """The weight a ModelPatcher would compute for ``key``, in float32: its stored weight plus its
    patches (LoRAs, merges, ...), from a get_key_patches entry, as ComfyUI's merge nodes nest them."""
    weight, convert = entry[0]
    out = convert(comfy.model_management.cast_to_device(weight, device, torch.float32, copy=True), inplace=True)
    if len(entry) > 1:
        out = comfy.lora.calculate_weight(entry[1:], out, key, intermediate_dtype=torch.float32,
                                          original_weights=originals)
    return out


class _Extraction:
    def __init__(self, node: str, rank: int, energy: float, method: str):
        self.node, self.rank, self.energy, self.method = node, rank, energy, method
        self.layers: dict[str, TriLoRALayer] = {}
        self.kept: dict[str, float] = {}
        self.parts: dict[str, int] = {}
        self.unchanged = 0
        self.vectors_changed = 0

    def side(self, part: str, tuned, base, prefix_filter, key_map: dict, fallback: Callable[[str], str], pbar,
             device) -> None:
        tuned_entries = tuned.get_key_patches(prefix_filter)
        base_entries = base.get_key_patches(prefix_filter)
        keys = _weight_keys(base_entries)
        self._check_same_architecture(part, tuned_entries, base_entries)
        names = prefixes_by_weight(key_map)
        count = 0
        for key in keys:
            comfy.model_management.throw_exception_if_processing_interrupted()
            t, b = tuned_entries[key], base_entries[key]
            if _unchanged(t, b):
                self.unchanged += 1
                pbar.update(1)
                continue
            delta = effective_weight(t, key, device, tuned_entries) - effective_weight(b, key, device, base_entries)
            layer = extract_layer(delta, rank=self.rank, energy=self.energy, method=self.method)
            if layer is None:
                self.unchanged += 1
            else:
                prefix = names.get(key) or fallback(key)
                self.kept[prefix] = kept_energy(layer, delta)
                self.layers[prefix] = layer.to(device="cpu")
                count += 1
            del delta
            pbar.update(1)
        for key in set(base_entries) - set(keys):
            t, b = tuned_entries[key], base_entries[key]
            if key.endswith((".weight", ".bias")) and not _unchanged(t, b) and b[0][0].is_floating_point():
                diff = effective_weight(t, key, device, tuned_entries) - effective_weight(b, key, device, base_entries)
                self.vectors_changed += int(bool((diff != 0).any()))
        self.parts[part] = count

    def _check_same_architecture(self, part: str, tuned: dict, base: dict) -> None:
        names = {"UNet": ("model_finetuned", "model_base"), "CLIP": ("clip_finetuned", "clip_base")}[part]
        for key in sorted(set(tuned) | set(base)):
            if key not in tuned or key not in base:
                where = names[1] if key in base else names[0]
                raise ValueError(f"{self.node}: {names[0]} and {names[1]} are different architectures: "
                                 f"{key} is only in {where}")
            a, b = tuple(tuned[key][0][0].shape), tuple(base[key][0][0].shape)
            if a != b:
                raise ValueError(f"{self.node}: {names[0]} and {names[1]} are different architectures: {key} "
                                 f"is {list(a)} in {names[0]} and {list(b)} in {names[1]}")


def _count_keys(patcher, prefix_filter) -> int:
    return len(_weight_keys(patcher.get_key_patches(prefix_filter)))


class TriLoRAExtract(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TriLoRAExtract",
            display_name="Extract TriLoRA from Checkpoints",
            category=CATEGORY,
            is_output_node=True,
            description="Extracts a TriLoRA from the difference of two models (fine-tuned minus base), UNet and "
                        "optionally text encoder: each changed weight's best approximation of the chosen rank or "
                        "energy (truncated SVD, one weight at a time). Works on any models ComfyUI can load or "
                        "patch, e.g. a checkpoint with several LoRAs applied minus the plain checkpoint.",
            inputs=[
                io.Model.Input(id="model_finetuned", tooltip="The fine-tuned (or merged, or LoRA-patched) "
                                                             "diffusion model."),
                io.Model.Input(id="model_base", tooltip="The base diffusion model it was made from."),
                prefix_input("trilora/extracted"),
                io.Int.Input(id="rank", default=32, min=1, max=4096,
                             tooltip="At most this many directions per layer (the strongest: least error "
                                     "possible). Also capped by each weight's own dimensions."),
                energy_input("Keep the fewest directions per layer that hold this share of the layer's "
                             "difference (sum of squared singular values), up to rank. 1.0 = rank alone decides."),
                io.Combo.Input(id="svd_method", options=list(SVD_METHODS), default="exact",
                               tooltip="exact: full SVD of each weight difference (optimal). randomized: "
                                       "torch.svd_lowrank, much faster when rank is far below the layer size, "
                                       "very slightly less accurate."),
                dtype_input("fp16", "fp16 is what LoRA files usually use; fp32 doubles the size."),
                io.Clip.Input(id="clip_finetuned", optional=True,
                              tooltip="Optional: the fine-tuned text encoder. Connect clip_base too to extract "
                                      "text-encoder layers."),
                io.Clip.Input(id="clip_base", optional=True, tooltip="Optional: the base text encoder."),
            ],
            outputs=[trilora_output(), filename_output(),
                     info_output("How many layers changed and were extracted, their ranks, and how much of "
                                 "the difference they keep.")],
        )

    @classmethod
    def execute(cls, model_finetuned, model_base, filename_prefix, rank, energy, svd_method, save_dtype,
                clip_finetuned=None, clip_base=None):
        node = "TriLoRAExtract"
        location = prefix_location(filename_prefix, node)
        if (clip_finetuned is None) != (clip_base is None):
            raise ValueError(f"{node}: connect both clip_finetuned and clip_base, or neither")
        device = comfy.model_management.get_torch_device()
        job = _Extraction(node, rank, energy if energy < 1.0 else None, svd_method)
        sides = [("UNet", model_finetuned, model_base, "diffusion_model.",
                  comfy.lora.model_lora_keys_unet(model_base.model, {}), lambda k: k.removesuffix(".weight"))]
        if clip_base is not None:
            sides.append(("CLIP", clip_finetuned.patcher, clip_base.patcher, None,
                          comfy.lora.model_lora_keys_clip(clip_base.cond_stage_model, {}),
                          lambda k: "text_encoders." + k.removesuffix(".weight")))
        pbar = comfy.utils.ProgressBar(sum(_count_keys(base, f) for _, _, base, f, _, _ in sides))
        for part, tuned, base, prefix_filter, key_map, fallback in sides:
            job.side(part, tuned, base, prefix_filter, key_map, fallback, pbar, device)
        if not job.layers:
            pair = "the models" + (" and the text encoders" if clip_base is not None else "")
            raise ValueError(f"{node}: {pair} have the same weights: nothing to extract")
        metadata = {**base_model_metadata(model_base),
                    **tool_args("extract", rank=rank, energy=energy, svd_method=svd_method,
                                text_encoder=clip_base is not None)}
        name, written = write_layers(location, job.layers, metadata, save_dtype)
        total = sum(job.kept.values()) / len(job.kept)
        worst = min(job.kept, key=job.kept.get)
        parts = ", ".join(f"{p} {n}" for p, n in job.parts.items())
        info = (f"extracted {len(job.layers)} changed layers ({parts}), {_rank_text(written.layers)}; they keep "
                f"{total:.1%} of the difference on average (least: {job.kept[worst]:.1%} in {worst}); "
                f"{job.unchanged} weights unchanged; saved as {name}")
        if job.vectors_changed:
            info += (f"; {job.vectors_changed} changed biases/norm weights are not included (TriLoRA adapts "
                     "matrices and convolutions only)")
        return io.NodeOutput(written, name, info)


# --------------------------------------------------------------------------- resize


class TriLoRAResize(OptionalLorasFileNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TriLoRAResize",
            display_name="Resize TriLoRA (Rank / Energy)",
            category=CATEGORY,
            is_output_node=True,
            description="Cuts each layer of a TriLoRA to its strongest directions and saves a smaller file: the "
                        "optimal cut (least error possible), as the loaders' max_rank / energy do at load time.",
            inputs=[
                file_choice("trilora_name", "The TriLoRA (or plain LoRA/LoCon, converted exactly) to resize, "
                            "from your loras folder. Ignored when the trilora input is connected.", none=True),
                prefix_input("trilora/resized"),
                max_rank_input("Keep at most this many directions per layer, the strongest ones. 0 = no limit.",
                               default=16),
                energy_input("Keep the fewest directions per layer that hold this share of the layer's energy "
                             "(sum of squared singular values). 1.0 = max_rank alone decides."),
                dtype_input("fp32", EXACT_DTYPE),
                optional_trilora_input("An in-memory TriLoRA to resize instead of a file."),
            ],
            outputs=[trilora_output(), filename_output(),
                     info_output("Ranks before and after, and the share of the energy kept.")],
        )

    @classmethod
    def execute(cls, trilora_name, filename_prefix, max_rank, energy, save_dtype, trilora=None):
        node = "TriLoRAResize"
        location = prefix_location(filename_prefix, node)
        label, source = read_source(node, trilora_name, trilora)
        layers = fold_aliases(source.layers)  # one weight, one cut: the optimal one for its whole delta
        cut = {p: truncate(layer, rank=max_rank or None, energy=energy if energy < 1.0 else None)
               for p, layer in layers.items()}
        kept = {p: _energy(cut[p]) / e if (e := _energy(layer)) > 0 else 1.0 for p, layer in layers.items()}
        metadata = {**carried_metadata(source.metadata),
                    **tool_args("resize", source=label, max_rank=max_rank, energy=energy)}
        name, written = write_layers(location, cut, metadata, save_dtype)
        worst = min(kept, key=kept.get)
        info = (f"resized {label}: {len(cut)} layers, {_rank_text(layers)} -> {_rank_text(written.layers)}; "
                f"energy kept {sum(kept.values()) / len(kept):.1%} on average (least: {kept[worst]:.1%} in {worst}); "
                f"saved as {name}{_alias_text(alias_groups(source.layers))}")
        return io.NodeOutput(written, name, info)


# --------------------------------------------------------------------------- merge


def _merge_inputs() -> list:
    inputs = []
    for i in range(1, MERGE_SLOTS + 1):
        inputs.append(file_choice(f"trilora_name_{i}", f"TriLoRA (or plain LoRA/LoCon) number {i} from your loras "
                                  f"folder; {NONE_FILE} leaves the slot empty. Ignored when trilora_{i} is "
                                  "connected.", none=True))
        inputs.append(io.Float.Input(id=f"weight_{i}", default=1.0, min=-10.0, max=10.0, step=0.01,
                                     tooltip=f"Weight of TriLoRA {i} in the sum: 1.0 = as is, 0.5 = half, "
                                             "negative = subtracted."))
    return inputs


class TriLoRAMerge(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TriLoRAMerge",
            display_name="Merge TriLoRAs",
            category=CATEGORY,
            is_output_node=True,
            description="Merges up to 4 TriLoRAs with weights into one canonical TriLoRA: exactly their "
                        "weighted sum when max_rank allows (0 = always), else its best approximation of that "
                        "rank. Layers are matched by name.",
            inputs=[
                prefix_input("trilora/merged"),
                *_merge_inputs(),
                max_rank_input("Rank limit per layer of the merged TriLoRA. 0 = no limit: the merge is exact "
                               "(each layer's rank is at most the sum of the inputs' ranks)."),
                energy_input("Keep the fewest directions per merged layer that hold this share of its energy. "
                             "1.0 = max_rank alone decides."),
                dtype_input("fp32", EXACT_DTYPE),
                *[optional_trilora_input(f"An in-memory TriLoRA for slot {i} instead of trilora_name_{i}.",
                                         input_id=f"trilora_{i}") for i in range(1, MERGE_SLOTS + 1)],
            ],
            outputs=[trilora_output(), filename_output(),
                     info_output("What was merged with which weights, and the merged ranks.")],
        )

    @classmethod
    def validate_inputs(cls, trilora_name_1=None, trilora_name_2=None, trilora_name_3=None, trilora_name_4=None):
        return check_names(trilora_name_1, trilora_name_2, trilora_name_3, trilora_name_4)

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        return files_fingerprint(*(kwargs.get(f"trilora_name_{i}") for i in range(1, MERGE_SLOTS + 1)))

    @classmethod
    def execute(cls, filename_prefix, max_rank, energy, save_dtype, **slots):
        node = "TriLoRAMerge"
        location = prefix_location(filename_prefix, node)
        sources, labels, weights, metas = [], [], [], []
        for i in range(1, MERGE_SLOTS + 1):
            name, memory = slots.get(f"trilora_name_{i}", NONE_FILE), slots.get(f"trilora_{i}")
            if memory is None and name in (None, "", NONE_FILE):
                continue
            label, adapter = read_source(node, name, memory, f"trilora_name_{i}", f"trilora_{i}")
            weight = float(slots.get(f"weight_{i}", 1.0))
            sources.append((adapter.layers, weight))
            labels.append(label)
            weights.append(weight)
            metas.append(carried_metadata(adapter.metadata))
        if not sources:
            raise ValueError(f"{node}: nothing to merge; choose files in trilora_name_1 to trilora_name_{MERGE_SLOTS} "
                             "or connect the trilora inputs")
        merged = merge_files(sources, rank=max_rank or None, energy=energy if energy < 1.0 else None,
                             names=labels)
        common = {k: v for k, v in metas[0].items() if all(m.get(k) == v for m in metas[1:])}  # e.g. base model
        common.pop("trilora_training_args", None)
        metadata = {**common, **tool_args("merge", sources=labels, weights=weights, max_rank=max_rank,
                                          energy=energy)}
        name, written = write_layers(location, merged, metadata, save_dtype)
        parts = ", ".join(f"{w:g} x {label}" for label, w in zip(labels, weights, strict=True))
        aliases = alias_groups({p: None for layers, _ in sources for p in layers})
        info = (f"merged {parts}: {len(merged)} layers, {_rank_text(written.layers)}; saved as {name}"
                + "".join(f"; {' and '.join(g)} adapt one weight: added" for g in aliases))
        return io.NodeOutput(written, name, info)


# --------------------------------------------------------------------------- spectrum


class TriLoRASpectrum(OptionalLorasFileNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TriLoRASpectrum",
            display_name="TriLoRA Spectrum",
            category=CATEGORY,
            description="Plots each layer's singular values and cumulative energy, and sums up how many "
                        "directions each part of the model uses (UNet input/middle/output blocks, text "
                        "encoder): a guide for max_rank / energy and for block weights.",
            inputs=[
                file_choice("trilora_name", "The TriLoRA (or plain LoRA/LoCon, converted exactly) to look at, "
                            "from your loras folder. Ignored when the trilora input is connected.", none=True),
                optional_trilora_input("An in-memory TriLoRA (e.g. from Train TriLoRA or Extract TriLoRA) to "
                                       "look at instead of a file."),
            ],
            outputs=[
                io.Image.Output(id="spectrum", display_name="spectrum",
                                tooltip="Top: each layer's singular values (log scale). Bottom: their cumulative "
                                        "share of the layer's energy, with 90% and 99% guides. One colour per "
                                        "model part."),
                io.String.Output(id="summary", display_name="summary",
                                 tooltip="Text summary per model part: layers, ranks, directions needed for 90% "
                                         "and 99% of the energy, and each part's share of the total energy."),
            ],
        )

    @classmethod
    def execute(cls, trilora_name, trilora=None):
        label, adapter = read_source("TriLoRASpectrum", trilora_name, trilora, keep_diffs=True)
        spectra = spectrum_view.layer_spectra(fold_aliases(adapter.layers))  # one weight, one spectrum
        image = spectrum_view.plot(spectra, f"TriLoRA spectrum: {label} ({len(spectra)} layers)")
        text = spectrum_view.summary(spectra, label) + _alias_text(alias_groups(adapter.layers))
        if adapter.diffs:
            text += (f"\n{len(adapter.diffs)} full-weight diffs (.diff/.diff_b) are not low-rank and not shown; "
                     "the loaders apply them as ComfyUI's LoraLoader does")
        return io.NodeOutput(spectrum_view.to_comfy_image(image), text)


NODES = [TriLoRAConvertLoRA, TriLoRAExportLoRA, TriLoRAExtract, TriLoRAResize, TriLoRAMerge, TriLoRASpectrum]
