"""Puts TriLoRA layers onto ComfyUI models: file prefixes resolved through ComfyUI's own key maps
(trilora_core.key_map.lookup: every naming and every form of map entry ComfyUI has), shapes checked
against the model, then patches added to clones (the inputs are never changed). Everything is
checked before anything is patched, so a bad file never half-applies."""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import comfy.lora
import torch

from ..trilora_core import (
    TEXT_ENCODERS,
    TriLoRAFileError,
    TriLoRALayer,
    block_group,
    lookup,
    rank_range,
    sum_layers,
    target_of,
)
from .adapter import TriLoRAAdapter
from .noise_rank import add_noise_rank, hookable

log = logging.getLogger("comfyui-trilora")


@dataclass
class ApplyReport:
    """What matched where, for the loader's info output and log line."""

    source: str
    total: int
    matched: dict[str, int] = field(default_factory=dict)  # "UNet"/"CLIP" -> layers patched
    unmatched: list[str] = field(default_factory=list)
    ranks: list[int] = field(default_factory=list)
    aliases: list[list[str]] = field(default_factory=list)  # prefixes applied together on one weight
    diffs: dict[str, int] = field(default_factory=dict)  # "UNet"/"CLIP" -> full-weight diffs patched
    text_encoder_left: list[str] = field(default_factory=list)  # TE layers a model-only node leaves out
    schedule: tuple[int, float] | None = None  # T-LoRA's noise-level rank recorded in the file
    noise_rank: int = 0  # UNet layers masked by noise level at sampling
    noise_rank_off: str = ""  # why a file's noise-level rank is not applied

    def summary(self) -> str:
        parts = ", ".join(f"{part} {n}" for part, n in self.matched.items()) or "none"
        text = f"{self.source}: {sum(self.matched.values())} of {self.total} layers matched ({parts})"
        if self.ranks:
            text += f"; rank {rank_range(self.ranks)}"
        if self.diffs:
            where = ", ".join(f"{part} {n}" for part, n in self.diffs.items())
            text += (f"; {sum(self.diffs.values())} full-weight diffs (.diff/.diff_b, as ComfyUI's Train LoRA "
                     f"writes them) applied as ComfyUI's LoraLoader applies them ({where})")
        text += self.noise_rank_text()
        for group in self.aliases:
            text += f"; {' and '.join(group)} adapt the same weight: applied as their sum"
        if self.text_encoder_left:
            n = len(self.text_encoder_left)
            text += (f"; the file holds only text-encoder layers ({n}), which this node does not apply"
                     if n == self.total else f"; {n} text-encoder layers not applied by this node")
        if self.unmatched:
            shown = ", ".join(self.unmatched[:10]) + (" ..." if len(self.unmatched) > 10 else "")
            text += f"; {len(self.unmatched)} not matched: {shown}"
        return text


    def noise_rank_text(self) -> str:
        if self.schedule is None:
            return ""
        what = f"; noise-level rank (T-LoRA, min_rank {self.schedule[0]}): "
        if self.noise_rank_off:
            return what + f"not applied ({self.noise_rank_off}): every direction at every step"
        full = self.matched.get("UNet", 0) - self.noise_rank
        text = what + (f"{self.noise_rank} UNet layers use, at each sampling step, the directions trained at "
                       f"its noise level (by sigma)")
        return text + (f"; {full} UNet layers on fused weights use every direction" if full > 0 else "")


def weight_shape(state_dict, value) -> tuple[int, ...] | None:
    """Shape of what a key-map value points at (a slice (dim, start, length) where it has one);
    None when the model has no such weight."""
    target = target_of(value)
    if target is None or target.weight not in state_dict:
        return None
    shape = list(state_dict[target.weight].shape)
    if target.offset is not None:
        dim, _start, length = target.offset
        shape[dim] = length
    return tuple(shape)


def _fits(got: tuple, expected: tuple) -> bool:
    # conv LoRAs may store the down factor flattened ([r, in*kh*kw]; ComfyUI's TrainLoraNode does)
    return got == expected or (len(expected) >= 2 and (got[0], _numel(got[1:])) == (expected[0], _numel(expected[1:])))


def plan_patches(layers: dict[str, TriLoRALayer], key_map: dict, state_dict, source: str
                 ) -> tuple[dict, dict[object, list[str]]]:
    """({patch key: adapter}, {patch key: file prefixes}) for the layers this model has; raises
    on a shape that does not fit. The patch key is ComfyUI's key-map value, as its LoraLoader
    passes it to add_patches. Prefixes that name the same patch key are applied as their sum."""
    found: dict[object, list[str]] = {}
    for prefix, layer in sorted(layers.items()):
        hit = lookup(prefix, key_map)
        expected = weight_shape(state_dict, hit[0]) if hit is not None else None
        if expected is None:
            continue
        got = tuple(layer.weight_shape)
        if not _fits(got, expected):
            raise TriLoRAFileError(source, prefix, f"layer shape {list(got)} does not fit the model's "
                                   f"{hit[1].weight} {list(expected)}; was the file made for another base model?")
        found.setdefault(hit[0], []).append(prefix)
    patches = {}
    for key, prefixes in found.items():
        group = [layers[p] for p in prefixes]
        layer = group[0] if len(group) == 1 else sum_layers(group)
        patches[key] = TriLoRAAdapter.from_layer(layer)
    return patches, found


def _diff_target(key: str, key_map: dict) -> str | None:
    """The model key ComfyUI's load_lora patches with a P.diff (the weight) or P.diff_b (its bias)."""
    prefix, _, part = key.rpartition(".")
    weight = key_map.get(prefix)
    if not isinstance(weight, str):
        return None
    return weight if part == "diff" else weight.removesuffix(".weight") + ".bias"


def plan_diffs(diffs: dict[str, torch.Tensor], key_map: dict, state_dict, source: str) -> tuple[dict, set[str]]:
    """({weight or bias key: ("diff", (tensor,))}, the file keys used) for the file's P.diff /
    P.diff_b entries this model has, the patches built by ComfyUI's own comfy.lora.load_lora.
    Raises on a diff whose shape is not its weight's."""
    used = {k: t for k in diffs if (t := _diff_target(k, key_map)) is not None and t in state_dict}
    if not used:
        return {}, set()
    for key, target in used.items():
        if tuple(diffs[key].shape) != tuple(state_dict[target].shape):
            raise TriLoRAFileError(source, key, f"shape {list(diffs[key].shape)} does not fit the model's {target} "
                                   f"{list(state_dict[target].shape)}; was the file made for another base model?")
    to_load = {k.rpartition(".")[0]: key_map[k.rpartition(".")[0]] for k in used}
    patches = comfy.lora.load_lora({k: diffs[k] for k in used}, to_load, log_missing=False)
    return {k: v for k, v in patches.items() if k in state_dict}, set(used)


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
                  source: str, key_strength: Callable[[str, str], float] | None = None,
                  diffs: dict[str, torch.Tensor] | None = None, schedule: tuple[int, float] | None = None,
                  schedule_off: str = ""):
    """Returns (model, clip, report): clones carrying the patches, or the inputs where a strength
    is 0 or there is nothing to patch. Raises TriLoRAFileError when no layer fits the model.

    ``key_strength(part, weight_key)``, when given, is a multiplier on top of the side's strength
    for each patched weight (part "UNet" or "CLIP", weight_key the model's state-dict key): the
    block-weights loader uses it. Weights whose strength comes to 0 are left unpatched.
    ``diffs`` are a file's full-weight diffs (P.diff / P.diff_b), applied as ComfyUI applies them.
    With ``clip`` None, text-encoder layers are left out and said so, never an error.
    ``schedule`` (min_rank, power): T-LoRA's noise-level rank the file records (noise_rank.py)
    for the diffusion model's layers; ``schedule_off`` says why a recorded one is not applied."""
    diffs = diffs or {}
    report = ApplyReport(source, len(layers), schedule=schedule, noise_rank_off=schedule_off)
    sides = []
    if model is not None:
        sides.append(("UNet", model, model.model, comfy.lora.model_lora_keys_unet(model.model, {}), strength_model))
    if clip is not None:
        sides.append(("CLIP", clip, clip.cond_stage_model,
                      comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {}), strength_clip))
    planned, claimed, diffs_used = _plan(sides, layers, diffs, source, report)
    rest = sorted(p for p in layers if p not in claimed)
    if clip is None:
        report.text_encoder_left = [p for p in rest if block_group(p) in TEXT_ENCODERS]
        rest = [p for p in rest if p not in report.text_encoder_left]
    if not claimed and layers and not report.text_encoder_left:
        raise TriLoRAFileError(source, None, f"no layer of the file matches this model (0 of {len(layers)}; "
                               f"first keys: {', '.join(list(layers)[:3])}); was it made for another base model?")
    results = _patch(planned, key_strength, report)
    report.unmatched = rest + sorted(k for k in diffs if k not in diffs_used)
    log.info("TriLoRA %s", report.summary())
    return results.get("UNet", model), results.get("CLIP", clip), report


def _plan(sides: list, layers: dict[str, TriLoRALayer], diffs: dict[str, torch.Tensor], source: str,
          report: ApplyReport) -> tuple[list, set[str], set[str]]:
    """(per side: (part, holder, patches, layers matched, diffs matched, strength), file prefixes
    claimed, diff keys used); alias groups go into ``report``."""
    planned, claimed, diffs_used = [], set(), set()
    for part, holder, module, key_map, strength in sides:
        state_dict = module.state_dict()
        patches, found = plan_patches(layers, key_map, state_dict, source)
        diff_patches, used = plan_diffs(diffs, key_map, state_dict, source)
        diffs_used |= used
        for prefixes in found.values():
            claimed.update(prefixes)
            if len(prefixes) > 1:
                report.aliases.append(prefixes)
        n_layers = sum(len(prefixes) for prefixes in found.values())
        planned.append((part, holder, {**patches, **diff_patches}, n_layers, len(diff_patches), strength))
    return planned, claimed, diffs_used


def _patch(planned: list, key_strength, report: ApplyReport) -> dict:
    """{part: a clone of its holder carrying its patches}, for the sides that get any."""
    results = {}
    for part, holder, patches, n_layers, n_diffs, strength in planned:
        report.matched[part] = n_layers
        if n_diffs:
            report.diffs[part] = n_diffs
        report.ranks += [a.weights[1].shape[0] for a in patches.values() if isinstance(a, TriLoRAAdapter)]
        groups = group_by_strength(part, patches, strength, key_strength) if strength != 0 else {}
        if not groups:
            continue
        clone = holder.clone()
        masked = {}
        for group_strength, group in groups.items():
            if part == "UNet" and report.schedule and not report.noise_rank_off:
                masked.update(_noise_rank_layers(clone.model, group, group_strength))
                group = {k: a for k, a in group.items() if k not in masked}
            if group:
                clone.add_patches(group, group_strength)
        if masked:
            add_noise_rank(clone, masked, report.schedule)
            report.noise_rank = len(masked)
        results[part] = clone
    return results


def _noise_rank_layers(model, patches: dict, strength: float) -> dict:
    """{weight key: (layer, strength)} of the patches the noise-level mask can hook: whole weights."""
    return {k: (a.layer, strength) for k, a in patches.items() if isinstance(a, TriLoRAAdapter) and hookable(model, k)}
