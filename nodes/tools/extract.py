"""TriLoRAExtract: a TriLoRA from the difference of two models (fine-tuned minus base), one weight
at a time (trilora_core.extract_layer), from the weights ComfyUI's ModelPatcher would compute."""
from __future__ import annotations

from collections.abc import Callable

import comfy.lora
import comfy.model_management
import comfy.utils
import torch
from comfy_api.latest import io

from ...trilora_core import SVD_METHODS, TriLoRALayer, extract_layer, kept_energy, prefixes_by_weight
from ..families import base_model_metadata
from ..loras_folder import prefix_location
from ..schema import dtype_input, energy_input, filename_output, info_output, prefix_input, trilora_output
from .common import rank_text, save_tool_output, tool_args, tool_schema


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

    def describe(self, name: str, written) -> str:
        """The info output once the layers are written as ``name``."""
        total = sum(self.kept.values()) / len(self.kept)
        worst = min(self.kept, key=self.kept.get)
        parts = ", ".join(f"{p} {n}" for p, n in self.parts.items())
        info = (f"extracted {len(self.layers)} changed layers ({parts}), {rank_text(written.layers)}; they keep "
                f"{total:.1%} of the difference on average (least: {self.kept[worst]:.1%} in {worst}); "
                f"{self.unchanged} weights unchanged; saved as {name}")
        if self.vectors_changed:
            info += (f"; {self.vectors_changed} changed biases/norm weights are not included (TriLoRA adapts "
                     "matrices and convolutions only)")
        return info

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
        return tool_schema(
            cls, "Extract TriLoRA from Checkpoints",
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
        node = cls.__name__
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
        return save_tool_output(location, job.layers, metadata, save_dtype, job.describe)
