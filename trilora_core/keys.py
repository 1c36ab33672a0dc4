"""Module prefixes for adapted weights, driven by a ComfyUI-style key map.

A key map is {file_prefix: model_weight_key}, with many aliases per weight (kohya
``lora_unet_...``/``lora_te_...`` names, generic ``diffusion_model....`` names, diffusers names).
A value may be a tuple whose first element is the weight key (ComfyUI uses that for slices of a
weight); the rest says which slice.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

KeyMap = Mapping[str, "str | tuple"]

_WEIGHT_SUFFIX = ".weight"
_UNET_MODEL_PREFIX = "diffusion_model."
_TEXT_ENCODER_GENERIC_PREFIX = "text_encoders."


def _target(value: object) -> tuple[str | None, bool]:
    """(weight key, addresses the whole weight) for one key-map value."""
    if isinstance(value, str):
        return value, True
    if isinstance(value, tuple) and value and isinstance(value[0], str):
        # (key,) or (key, None) still mean the whole weight; (key, slice) means part of it.
        whole = len(value) == 1 or all(part is None for part in value[1:])
        return value[0], whole
    return None, False


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
