"""File prefixes and model weights, driven by a ComfyUI key map (comfy.lora.model_lora_keys_*,
which nodes/ passes in): the one place where any file naming is resolved to a weight.

A key map is {file_prefix: value}, with many aliases per weight (kohya ``lora_unet_...``/
``lora_te_...`` names, generic ``diffusion_model....`` names, diffusers/PEFT names, ...). The
value names the weight in one of three forms (``target_of``). Choosing the name to write a weight
under: ``prefix_for_weight``; reading a file: ``lookup`` and ``layers_by_weight``; writing a
file's layers under the names of a model's key map (the converter and the kohya export):
``rename_layers`` with ``prefixes_by_weight`` or ``kohya_prefixes``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .layer import TriLoRALayer
from .merge import alias_groups, fold_aliases, merge_layers

KeyMap = Mapping[str, "str | tuple"]

_WEIGHT_SUFFIX = ".weight"
_UNET_MODEL_PREFIX = "diffusion_model."
_TEXT_ENCODER_GENERIC_PREFIX = "text_encoders."


def _target(value: object) -> tuple[str | None, bool]:
    """(weight key, addresses the whole weight as it is) for one key-map value."""
    found = target_of(value)
    if found is None:
        return None, False
    return found.weight, found.offset is None and found.function is None


def _strip_weight(weight_key: str) -> str:
    return weight_key[: -len(_WEIGHT_SUFFIX)] if weight_key.endswith(_WEIGHT_SUFFIX) else weight_key


def _mechanical_unet_prefix(weight_key: str) -> str | None:
    """The kohya name derived from the weight key itself (ComfyUI adds it for every UNet weight)."""
    if not weight_key.startswith(_UNET_MODEL_PREFIX):
        return None
    return "lora_unet_" + _strip_weight(weight_key[len(_UNET_MODEL_PREFIX) :]).replace(".", "_")


def _choose(weight_key: str, aliases: Iterable[str], sdxl_text_encoders: bool) -> str:
    """The preferred alias: kohya names first, then ComfyUI's generic names, else any alias."""
    aliases = sorted(set(aliases))  # sorted: the choice never depends on dict order
    alias_set = set(aliases)

    unet = [a for a in aliases if a.startswith("lora_unet_")]
    if unet:
        mechanical = _mechanical_unet_prefix(weight_key)
        return mechanical if mechanical in alias_set else unet[0]

    te = [a for a in aliases if a.startswith(("lora_te_", "lora_te1_", "lora_te2_", "lora_te3_"))]
    if te:
        # CLIP-L is known as both lora_te_ and lora_te1_: kohya uses lora_te1_ only for SDXL,
        # which is the map that also has lora_te2_ names.
        family_order = ("lora_te1_", "lora_te_") if sdxl_text_encoders else ("lora_te_", "lora_te1_")
        for family in (*family_order, "lora_te2_", "lora_te3_"):
            for alias in te:
                if alias.startswith(family):
                    return alias

    other_kohya = [a for a in aliases if a.startswith("lora_")]
    if other_kohya:
        return other_kohya[0]

    stripped = _strip_weight(weight_key)
    for generic in (stripped, _TEXT_ENCODER_GENERIC_PREFIX + stripped):
        if generic in alias_set:
            return generic
    return aliases[0] if aliases else stripped


def _has_sdxl_text_encoders(key_map: KeyMap) -> bool:
    return any(k.startswith("lora_te2_") for k in key_map)


def prefix_for_weight(weight_key: str, key_map: KeyMap) -> str:
    """The file prefix to store the adapter of ``weight_key`` under.

    A kohya-style alias (``lora_unet_``, ``lora_te_``/``lora_te1_``/``lora_te2_``, other
    ``lora_``) when the map has one, else ComfyUI's generic name, else ``weight_key`` without
    ``.weight``. Aliases that address only a slice of the weight are never chosen.
    """
    aliases = []
    for alias, value in key_map.items():
        target, whole = _target(value)
        if whole and target == weight_key:
            aliases.append(alias)
    return _choose(weight_key, aliases, _has_sdxl_text_encoders(key_map))


def weight_for_prefix(prefix: str, key_map: KeyMap) -> str | None:
    """The model weight key a file prefix maps to, or None when the map does not know it."""
    target, _ = _target(key_map.get(prefix))
    return target


def prefixes_by_weight(key_map: KeyMap) -> dict[str, str]:
    """{weight_key: prefix} for every weight the map knows, chosen as prefix_for_weight does."""
    aliases_by_weight: dict[str, list[str]] = {}
    for alias, value in key_map.items():
        target, whole = _target(value)
        if whole and target is not None:
            aliases_by_weight.setdefault(target, []).append(alias)
    sdxl = _has_sdxl_text_encoders(key_map)
    return {weight: _choose(weight, aliases, sdxl) for weight, aliases in sorted(aliases_by_weight.items())}


# --------------------------------------------------------------------------- resolving file prefixes
#
# A ComfyUI key-map value takes one of three forms (comfy/lora.py, comfy/utils.py *_to_diffusers):
#   "weight key"                           the whole weight
#   ("weight key", (dim, start, length))   a slice of it (diffusers q/k/v of a fused qkv weight)
#   ("weight key", None | slice, function) the delta goes through function first (swap_scale_shift)
# ComfyUI's ModelPatcher.add_patches takes the value itself as the patch key.


@dataclass(frozen=True)
class Target:
    """Where a file prefix's delta goes: ``weight`` (a model state-dict key), the rows or columns
    ``offset`` = (dim, start, length) of it (None: all of it), after ``function`` (None: as is)."""

    weight: str
    offset: tuple[int, int, int] | None = None
    function: Callable[[Tensor], Tensor] | None = None


def target_of(value: object) -> Target | None:
    """The Target of one key-map value in any of its three forms; None for anything else."""
    if isinstance(value, str):
        return Target(value)
    if not isinstance(value, tuple) or not value or not isinstance(value[0], str):
        return None
    # (key,) and (key, None) still mean the whole weight
    offset = value[1] if len(value) > 1 else None
    if offset is not None and not (isinstance(offset, tuple) and len(offset) == 3):
        return None
    function = value[2] if len(value) > 2 else None
    return Target(value[0], tuple(offset) if offset is not None else None, function)


def name_variants(prefix: str) -> Iterable[str]:
    """The prefix, then the name ComfyUI's map has for PEFT/diffusers attention layers saved
    without ``processor.`` (``attn1.to_q``, ``attn1.to_out.0`` -> ``attn1.processor.to_out``)."""
    yield prefix
    if ".to_" in prefix and ".processor." not in prefix:
        variant = prefix.replace(".to_", ".processor.to_")
        yield variant.removesuffix(".0") if variant.endswith(".to_out.0") else variant


def lookup(prefix: str, key_map: KeyMap) -> tuple[object, Target] | None:
    """(key-map value, its Target) for a file prefix, or None when the map does not know it."""
    for name in name_variants(prefix):
        value = key_map.get(name)
        found = target_of(value) if value is not None else None
        if found is not None:
            return value, found
    return None


def whole_weight_layer(layer: TriLoRALayer, target: Target, weight_shape: Sequence[int]) -> TriLoRALayer:
    """The layer on the whole weight, Vt shaped like it: a slice's factors padded with zeros
    (rows: U, columns: Vt), ``function`` applied to U. Exact for the row permutations ComfyUI's maps use (swap_scale_shift).
    Raises ValueError when the layer does not fit the weight."""
    out, rest = int(weight_shape[0]), math.prod(weight_shape[1:])
    rows, cols = out, rest
    if target.offset is not None:
        dim, start, length = target.offset
        if dim not in (0, 1) or start < 0 or start + length > weight_shape[dim]:
            raise ValueError(f"slice {target.offset} is outside {target.weight} {list(weight_shape)}")
        rows, cols = (length, rest) if dim == 0 else (out, length * math.prod(weight_shape[2:]))
    if (layer.out_features, math.prod(layer.weight_shape[1:])) != (rows, cols):
        where = f"{target.weight}{list(weight_shape)}" + (f" slice {target.offset}" if target.offset else "")
        raise ValueError(f"layer shape {list(layer.weight_shape)} does not fit the model's {where}")
    if target.offset is None and target.function is None:
        if tuple(layer.vt.shape[1:]) == tuple(weight_shape[1:]):
            return layer
        # a conv LoRA stored flattened ([r, in*kh*kw], as ComfyUI's TrainLoraNode writes it)
        return TriLoRALayer(layer.u, layer.s, layer.vt.reshape(layer.rank, *weight_shape[1:]), layer.alpha)
    u, vt = layer.u, layer.vt.reshape(layer.rank, -1)
    if target.offset is not None:
        dim, start, length = target.offset
        if dim == 0:
            u = torch.zeros(out, layer.rank, dtype=u.dtype, device=u.device).index_copy(
                0, torch.arange(start, start + length, device=u.device), u)
        else:
            inner = math.prod(weight_shape[2:])
            full = torch.zeros(layer.rank, weight_shape[1], inner, dtype=vt.dtype, device=vt.device)
            full[:, start:start + length] = vt.reshape(layer.rank, length, inner)
            vt = full
    if target.function is not None:
        u = target.function(u)
        if tuple(u.shape) != (out, layer.rank):
            raise ValueError(f"the key map's function for {target.weight} changes the shape of its delta")
    return TriLoRALayer(u.contiguous(), layer.s, vt.reshape(layer.rank, *weight_shape[1:]), layer.alpha)


@dataclass
class ResolvedLayers:
    """A file's layers by the model weight they adapt (see ``layers_by_weight``)."""

    layers: dict[str, TriLoRALayer]  # weight key -> one layer on the whole weight
    sources: dict[str, list[str]]  # weight key -> the file prefixes that adapt it
    unknown: list[str]  # prefixes the key map does not know, or whose weight the model lacks

    def aliases(self) -> dict[str, list[str]]:
        """{weight: prefixes} for weights that more than one prefix adapts."""
        return {w: p for w, p in self.sources.items() if len(p) > 1}


def layers_by_weight(
    layers: Mapping[str, TriLoRALayer], key_map: KeyMap, weight_shapes: Mapping[str, Sequence[int]]
) -> ResolvedLayers:
    """Every prefix resolved through ``key_map`` to the model weight it adapts (``weight_shapes``:
    the model's state-dict shapes). Slices and functions are folded into whole-weight layers;
    several prefixes on one weight (aliases, or the q/k/v slices of one qkv weight) become one
    layer with the sum of their deltas, exactly (canonical, rank at most the sum of theirs).
    Raises ValueError naming the prefix whose shape does not fit its weight."""
    entries: dict[str, list[tuple[str, TriLoRALayer]]] = {}
    unknown = []
    for prefix, layer in sorted(layers.items()):
        found = lookup(prefix, key_map)
        if found is None or found[1].weight not in weight_shapes:
            unknown.append(prefix)
            continue
        target = found[1]
        try:
            whole = whole_weight_layer(layer, target, weight_shapes[target.weight])
        except ValueError as err:
            raise ValueError(f"{prefix}: {err}") from None
        entries.setdefault(target.weight, []).append((prefix, whole))
    out = {}
    for weight, parts in entries.items():
        out[weight] = parts[0][1] if len(parts) == 1 else sum_layers([layer for _, layer in parts])
    return ResolvedLayers(out, {w: [p for p, _ in parts] for w, parts in entries.items()}, unknown)


def sum_layers(layers: Sequence[TriLoRALayer]) -> TriLoRALayer:
    """The canonical layer whose delta is the sum of the layers' deltas (exact)."""
    return merge_layers([(layer, 1.0) for layer in layers])


def kohya_prefixes(key_map: KeyMap) -> dict[str, str]:
    """{weight key: name kohya's sd-scripts use}: diffusers-style lora_unet_down_blocks_... for the
    UNet where ComfyUI knows one, lora_te_/lora_te1_/lora_te2_ for text encoders."""
    chosen = prefixes_by_weight(key_map)
    diffusers: dict[str, str] = {}
    for alias, target in key_map.items():
        if not isinstance(target, str) or not alias.startswith("lora_unet_"):
            continue
        mechanical = "lora_unet_" + target.removeprefix(_UNET_MODEL_PREFIX).removesuffix(_WEIGHT_SUFFIX).replace(".", "_")
        if alias != mechanical and (target not in diffusers or alias < diffusers[target]):
            diffusers[target] = alias
    return {weight: diffusers.get(weight, prefix) for weight, prefix in chosen.items()}


def rename_layers(layers: Mapping[str, TriLoRALayer], key_map: KeyMap | None,
                  weight_shapes: Mapping[str, Sequence[int]], names: Mapping[str, str]
                  ) -> tuple[dict[str, TriLoRALayer], list[str], list[list[str]]]:
    """(layers under the chosen names, prefixes the model does not know (kept as they are), groups
    of prefixes that adapt one weight). With a key map (and the model's ``weight_shapes``) each
    prefix is resolved to its weight (``layers_by_weight``) and saved under ``names[weight]``, else
    ``prefix_for_weight``; without one (None), aliases are told by their names alone. Entries on one
    weight become one layer with their summed delta (exact). Raises ValueError when a layer does
    not fit its weight, or when an unknown prefix would take the name of a renamed layer."""
    if key_map is None:
        return fold_aliases(layers), [], alias_groups(layers)
    try:
        resolved = layers_by_weight(layers, key_map, weight_shapes)
    except ValueError as err:
        raise ValueError(f"{err}; was the adapter made for another base model?") from None
    out = {names.get(weight, prefix_for_weight(weight, key_map)): layer for weight, layer in resolved.layers.items()}
    for prefix in resolved.unknown:
        if prefix in out:
            raise ValueError(f"layer {prefix} is not in the connected model, and another layer is saved under "
                             "that name; connect the model the adapter was made for")
        out[prefix] = layers[prefix]
    return dict(sorted(out.items())), resolved.unknown, list(resolved.aliases().values())


# --------------------------------------------------------------------------- other trainers' namings
#
# Writing a model's layers under the names another loader reads: ComfyUI's own generic names
# (``diffusion_model.X`` / ``text_encoders.X``, as its Train LoRA writes them) and the module names
# of diffusers' ``load_lora_weights`` and PEFT (``unet.`` / ``transformer.`` / ``text_encoder.``,
# as ai-toolkit and SimpleTuner write them). Both come from ComfyUI's key map of the model.

DIFFUSERS_ROOTS = ("unet.", "transformer.", "text_encoder.", "text_encoder_2.")


def comfyui_prefixes(key_map: KeyMap) -> dict[str, str]:
    """{weight key: ComfyUI's generic name}: the weight key without ``.weight`` (the diffusion
    model's ``diffusion_model.X``), ``text_encoders.X`` for a text encoder's; weights the map
    knows under neither are left out."""
    out = {}
    for weight in prefixes_by_weight(key_map):
        stripped = _strip_weight(weight)
        for generic in (stripped, _TEXT_ENCODER_GENERIC_PREFIX + stripped):
            if _target(key_map.get(generic)) == (weight, True):
                out[weight] = generic
                break
    return out


def _peft_name(alias: str) -> str:
    """ComfyUI's map spells diffusers UNet attention layers as the old attention processors did
    (``attn1.processor.to_out``); PEFT names the modules (``attn1.to_out.0``)."""
    name = alias.replace(".processor.to_", ".to_")
    return name + ".0" if name.endswith(".to_out") else name


def diffusers_prefixes(key_map: KeyMap) -> dict[str, list[tuple[str, tuple[int, int, int] | None]]]:
    """{weight key: [(diffusers/PEFT module name, row slice or None)]}: one whole-weight name where
    the map has one, else the names of the row slices diffusers splits the weight into (Flux's
    fused qkv as to_q / to_k / to_v), in row order. Names that reach a weight through a function
    (ComfyUI's swap_scale_shift) or a column slice are left out."""
    found: dict[str, dict[str, tuple | None]] = {}
    for alias, value in key_map.items():
        target = target_of(value) if alias.startswith(DIFFUSERS_ROOTS) else None
        if target is None or target.function is not None or (target.offset and target.offset[0] != 0):
            continue
        found.setdefault(target.weight, {})[_peft_name(alias)] = target.offset
    out = {}
    for weight, names in sorted(found.items()):
        whole = sorted(n for n, offset in names.items() if offset is None)
        out[weight] = [(whole[0], None)] if whole else sorted(names.items(), key=lambda item: item[1][1])
    return out


def split_rows(layer: TriLoRALayer, parts: Sequence[tuple[str, tuple[int, int, int] | None]],
               weight: str) -> dict[str, TriLoRALayer]:
    """{name: layer} writing ``layer`` under ``parts`` (``diffusers_prefixes``): whole, or one
    layer per row slice with those rows of U (the slices' deltas stack to the layer's, exactly).
    Raises ValueError when the slices do not tile the weight's rows."""
    if len(parts) == 1 and parts[0][1] is None:
        return {parts[0][0]: layer}
    rows = 0
    for _, (_, start, length) in parts:
        if start != rows:
            break
        rows += length
    if rows != layer.out_features:
        raise ValueError(f"the diffusers names of {weight} ({', '.join(n for n, _ in parts)}) do not cover its "
                         f"{layer.out_features} rows")
    return {name: TriLoRALayer(layer.u[start:start + length].contiguous(), layer.s, layer.vt, layer.alpha)
            for name, (_, start, length) in parts}
