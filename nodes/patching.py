"""Puts TriLoRA layers onto ComfyUI models: file prefixes matched through ComfyUI's own key maps,
shapes checked against the model, then patches added to clones (the inputs are never changed).
Everything is checked before anything is patched, so a bad file never half-applies."""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import comfy.lora

from ..trilora_core import TriLoRAFileError, TriLoRALayer
from .adapter import TriLoRAAdapter

log = logging.getLogger("comfyui-trilora")


@dataclass
class ApplyReport:
    """What matched where, for the loader's info output and log line."""

    source: str
    total: int
    matched: dict[str, int] = field(default_factory=dict)  # "UNet"/"CLIP" -> layers patched
    unmatched: list[str] = field(default_factory=list)
    ranks: list[int] = field(default_factory=list)

    def summary(self) -> str:
        parts = ", ".join(f"{part} {n}" for part, n in self.matched.items()) or "none"
        text = f"{self.source}: {sum(self.matched.values())} of {self.total} layers matched ({parts})"
        if self.ranks:
            lo, hi = min(self.ranks), max(self.ranks)
            text += f"; rank {lo}" if lo == hi else f"; rank {lo}-{hi}"
        if self.unmatched:
            shown = ", ".join(self.unmatched[:10]) + (" ..." if len(self.unmatched) > 10 else "")
            text += f"; {len(self.unmatched)} not matched: {shown}"
        return text


def weight_shape(state_dict, key):
    """Shape of the weight a key-map entry points at; tuple entries are slices (dim, start, length)."""
    if isinstance(key, tuple):
        name, (dim, _start, length) = key[0], key[1]
        shape = list(state_dict[name].shape)
        shape[dim] = length
        return tuple(shape)
    return tuple(state_dict[key].shape)


def plan_patches(layers: dict[str, TriLoRALayer], key_map: dict, state_dict, source: str) -> dict:
    """{model key: adapter} for the layers this model has; raises on a shape that does not fit."""
    patches = {}
    for prefix, layer in layers.items():
        key = key_map.get(prefix)
        if key is None:
            continue
        name = key[0] if isinstance(key, tuple) else key
        if name not in state_dict:
            continue
        expected = weight_shape(state_dict, key)
        got = tuple(layer.weight_shape)
        if got != expected and (len(expected) < 2 or (got[0], _numel(got[1:])) != (expected[0], _numel(expected[1:]))):
            raise TriLoRAFileError(source, prefix, f"layer shape {list(got)} does not fit the model's "
                                   f"{name} {list(expected)}; was the file made for another base model?")
        patches[key] = TriLoRAAdapter.from_layer(layer)
    return patches


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def group_by_strength(part: str, patches: dict, strength: float,
                      key_strength: Callable[[str, str], float] | None) -> dict[float, dict]:
    """{strength: patches} for add_patches, which takes one strength per call; zeros left out."""
    if key_strength is None:
        return {strength: patches} if patches else {}
    groups: dict[float, dict] = {}
    for key, adapter in patches.items():
        value = strength * float(key_strength(part, key[0] if isinstance(key, tuple) else key))
        if value != 0:
            groups.setdefault(value, {})[key] = adapter
    return groups


def apply_trilora(model, clip, layers: dict[str, TriLoRALayer], strength_model: float, strength_clip: float,
                  source: str, key_strength: Callable[[str, str], float] | None = None):
    """Returns (model, clip, report): clones carrying the patches, or the inputs where a strength
    is 0 or there is nothing to patch. Raises TriLoRAFileError when no layer fits the model.

    ``key_strength(part, weight_key)``, when given, is a multiplier on top of the side's strength
    for each patched weight (part "UNet" or "CLIP", weight_key the model's state-dict key): the
    block-weights loader uses it. Weights whose strength comes to 0 are left unpatched."""
    report = ApplyReport(source, len(layers))
    sides = []
    if model is not None:
        sides.append(("UNet", model, model.model, comfy.lora.model_lora_keys_unet(model.model, {}), strength_model))
    if clip is not None:
        sides.append(("CLIP", clip, clip.cond_stage_model,
                      comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {}), strength_clip))

    planned, claimed = [], set()
    for part, holder, module, key_map, strength in sides:
        patches = plan_patches(layers, key_map, module.state_dict(), source)
        claimed.update(p for p in layers if p in key_map and key_map[p] in patches)
        planned.append((part, holder, patches, strength))
    if not claimed and layers:
        raise TriLoRAFileError(source, None, f"no layer of the file matches this model (0 of {len(layers)}; "
                               f"first keys: {', '.join(list(layers)[:3])}); was it made for another base model?")

    results = {}
    for part, holder, patches, strength in planned:
        report.matched[part] = len(patches)
        report.ranks += [a.weights[1].shape[0] for a in patches.values()]
        groups = group_by_strength(part, patches, strength, key_strength) if strength != 0 else {}
        if not groups:
            results[part] = holder
            continue
        clone = holder.clone()
        for group_strength, group in groups.items():
            clone.add_patches(group, group_strength)
        results[part] = clone
    report.unmatched = sorted(p for p in layers if p not in claimed)
    log.info("TriLoRA %s", report.summary())
    return results.get("UNet", model), results.get("CLIP", clip), report
