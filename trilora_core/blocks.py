"""Which part of the model an adapted weight belongs to: UNet input / middle / output blocks, the
rest of the UNet, or a text encoder. Works on file prefixes in any naming ComfyUI reads (kohya
`lora_unet_input_blocks_...` or `lora_unet_down_blocks_...`, generic `diffusion_model....`,
diffusers `unet.down_blocks....`, `lora_te_...`, `text_encoders....`) and on model weight keys.

Transformer (DiT) models have no input/middle/output blocks but a stack of blocks; a DepthLayout
read off the model's weight keys, given the model family's block lists in forward order (the
family table, nodes/families.py), puts the early, middle and late thirds of the stack in the
input, middle and output groups. For Flux (19 double-stream then 38 single-stream blocks) that
is the double blocks, the first and the second half of the single blocks, where LoRA block
weight tools split Flux too; SD3's joint blocks, Wan's blocks, Qwen-Image's transformer blocks
and Lumina 2's layers split in thirds (Lumina's refiners, which run first, count as early).
Embedders and the final layer stay outside the three groups, as the UNet's time embedding does.
"""
from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass

INPUT = "UNet input blocks"
MIDDLE = "UNet middle block"
OUTPUT = "UNet output blocks"
UNET_OTHER = "UNet other"
TEXT_ENCODER = "Text encoder"
TEXT_ENCODER_2 = "Text encoder 2"
TEXT_ENCODER_3 = "Text encoder 3"
OTHER = "Other"
GROUPS = (INPUT, MIDDLE, OUTPUT, UNET_OTHER, TEXT_ENCODER, TEXT_ENCODER_2, TEXT_ENCODER_3, OTHER)
TEXT_ENCODERS = (TEXT_ENCODER, TEXT_ENCODER_2, TEXT_ENCODER_3)

_TE3 = ("lora_te3_", "text_encoders.t5xxl.", "t5xxl.", "text_encoder_3.")
_TE2 = ("lora_te2_", "text_encoder_2.", "text_encoders.clip_g.", "clip_g.")
_TE = ("lora_te_", "lora_te1_", "lora_prior_te_", "text_encoder.", "text_encoders.", "clip_l.", "clip_h.")
_UNET = ("lora_unet_", "lora_prior_unet_", "lycoris_", "model.diffusion_model.", "diffusion_model.", "unet.",
         "base_model.model.", "transformer.")
_INPUT = ("input_blocks_", "down_blocks_", "conv_in_")
_MIDDLE = ("middle_block_", "mid_block_")
_OUTPUT = ("output_blocks_", "up_blocks_", "out_", "conv_out_", "conv_norm_out_")


def block_group(name: str, layout: DepthLayout | None = None) -> str:
    """The group (one of GROUPS) of a file prefix or a model weight key; transformer blocks
    fall in the input/middle/output groups by their depth in ``layout``."""
    for prefixes, group in ((_TE3, TEXT_ENCODER_3), (_TE2, TEXT_ENCODER_2), (_TE, TEXT_ENCODER)):
        if name.startswith(prefixes):
            return group
    rest, unet = name, False
    for prefix in _UNET:
        if rest.startswith(prefix):
            rest, unet = rest[len(prefix):], True
            break
    flat = rest.replace(".", "_") + "_"
    if layout is not None and unet:
        return layout.group(flat) or UNET_OTHER
    if flat.startswith(_INPUT):
        return INPUT
    if flat.startswith(_MIDDLE):
        return MIDDLE
    if flat.startswith(_OUTPUT):
        return OUTPUT
    return UNET_OTHER if unet else OTHER


_SLIDERS = {INPUT: "input_blocks", MIDDLE: "middle_block", OUTPUT: "output_blocks"}


@dataclass(frozen=True)
class DepthLayout:
    """A transformer's block lists in forward order, with their lengths."""

    lists: tuple[tuple[str, int], ...]
    early: tuple[str, ...] = ()

    def group(self, flat: str) -> str | None:
        """INPUT, MIDDLE or OUTPUT for a block's weight (underscored name under the diffusion
        model, e.g. ``single_blocks_3_linear1_``); None outside the blocks."""
        match = _block_re(tuple(name for name, _ in self.lists) + self.early).match(flat)
        if match is None:
            return None
        name, index = match.group(1), int(match.group(2))
        if name in self.early:
            return INPUT
        offset = 0
        for list_name, length in self.lists:
            if list_name == name:
                return (INPUT, MIDDLE, OUTPUT)[min(3 * (offset + index) // self.total, 2)]
            offset += length
        return None

    @property
    def total(self) -> int:
        return sum(length for _, length in self.lists)

    def describe(self) -> str:
        """Which blocks each slider moves, e.g. ``input_blocks = double_blocks 0-18, ...``."""
        spans: dict[str, list[str]] = {group: [] for group in _SLIDERS}
        for name in self.early:
            spans[INPUT].append(f"{name} (all)")
        for name, length in self.lists:
            by_group: dict[str, list[int]] = {}
            for index in range(length):
                by_group.setdefault(self.group(f"{name}_{index}_"), []).append(index)
            for group, indices in by_group.items():
                spans[group].append(f"{name} {indices[0]}-{indices[-1]}" if len(indices) > 1 else f"{name} {indices[0]}")
        return ", ".join(f"{_SLIDERS[g]} = {' + '.join(s) or 'none'}" for g, s in spans.items())


@functools.cache
def _block_re(names: tuple[str, ...]) -> re.Pattern:
    # Longest names first: "single_blocks" must not match as "blocks".
    alternatives = "|".join(sorted(names, key=len, reverse=True))
    return re.compile(rf"^({alternatives})_(\d+)_")


def depth_layout(weight_keys: Iterable[str], stack: tuple[str, ...], early: tuple[str, ...] = ()) -> DepthLayout | None:
    """The DepthLayout of a transformer model from its weight keys (``diffusion_model.blocks.0....``),
    ``stack`` its block lists in forward order (double-stream before single-stream) and ``early``
    the lists that run before them (Lumina 2's refiners); None for a UNet or a model without any
    of those lists."""
    lengths: dict[str, int] = {}
    pattern = _block_re(tuple(stack) + tuple(early))
    for key in weight_keys:
        rest = key.removeprefix("diffusion_model.")
        if rest == key or rest.startswith(("input_blocks.", "middle_block.", "output_blocks.")):
            continue
        match = pattern.match(rest.replace(".", "_"))
        if match is not None:
            lengths[match.group(1)] = max(lengths.get(match.group(1), 0), int(match.group(2)) + 1)
    lists = tuple((name, lengths[name]) for name in stack if name in lengths)
    if not lists:
        return None
    return DepthLayout(lists, tuple(name for name in early if name in lengths))
