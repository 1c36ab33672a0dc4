"""TriLoRA as a ComfyUI weight adapter, in the shape of `comfy.weight_adapter`.

Registered when the pack loads, so ComfyUI's own patching applies TriLoRA files: weights are
patched when a model is loaded and restored when it is unloaded, low-VRAM loading recomputes the
patch per forward, and the stock LoraLoader and LoRA hook nodes read TriLoRA files too.

Newer ComfyUI releases rebuild adapters as `type(a)(a.loaded_keys, a.weights)` and, in bypass
mode, call `h(x, base_out)` / `g(y)` instead of merging weights: every tensor therefore lives in
`weights`, and `h`, `g` and `calculate_shape` are defined although 0.3.75 never calls them.
"""
from __future__ import annotations

import logging

import comfy.model_management
import torch
import torch.nn.functional as F
from comfy.weight_adapter.base import WeightAdapterBase, WeightAdapterTrainBase

from ..trilora_core import TRILORA_PARTS, TriLoRALayer, init_layer

SUFFIX_U, SUFFIX_S, SUFFIX_VT = (f".{part}" for part in TRILORA_PARTS)  # the file format's


def weighted_up(u: torch.Tensor, s: torch.Tensor, scale: float, device, dtype) -> torch.Tensor:
    """U diag(s) * scale, formed in float32 (it is small) and then cast, so a half-precision
    compute dtype never sees an overflowing or underflowing product of scale and s."""
    u32 = comfy.model_management.cast_to_device(u, device, torch.float32)
    s32 = comfy.model_management.cast_to_device(s, device, torch.float32)
    return (u32 * (s32 * scale)).to(dtype)


def bypass_delta(x, up, vt, is_conv, conv_dim, kw_dict) -> torch.Tensor:
    """The low-rank forward path x -> Vt -> (U diag(s) scale), without forming delta W."""
    if not is_conv:
        return F.linear(F.linear(x, vt.flatten(1)), up)
    conv = (F.conv1d, F.conv2d, F.conv3d)[conv_dim - 1]
    hidden = conv(x, vt, **kw_dict)
    return conv(hidden, up.reshape(*up.shape, *([1] * conv_dim)))


def masked_bypass_delta(x, up, vt, mask, is_conv, conv_dim, kw_dict) -> torch.Tensor:
    """``bypass_delta`` with direction i of sample b scaled by mask[b, i] ([batch, r]: a rank
    mask per sample, as T-LoRA's timestep masking trains)."""
    if not is_conv:
        hidden = F.linear(x, vt.flatten(1))
        return F.linear(hidden * mask.reshape(mask.shape[0], *([1] * (hidden.ndim - 2)), -1), up)
    conv = (F.conv1d, F.conv2d, F.conv3d)[conv_dim - 1]
    hidden = conv(x, vt, **kw_dict) * mask.reshape(*mask.shape, *([1] * conv_dim))
    return conv(hidden, up.reshape(*up.shape, *([1] * conv_dim)))


class TriLoRAAdapter(WeightAdapterBase):
    """An inference adapter: weights = (u, s, vt, alpha)."""

    name = "trilora"

    def __init__(self, loaded_keys, weights):
        self.loaded_keys = loaded_keys
        self.weights = weights

    @classmethod
    def from_layer(cls, layer: TriLoRALayer, loaded_keys=None) -> TriLoRAAdapter:
        return cls(set(loaded_keys or ()), (layer.u, layer.s, layer.vt, float(layer.alpha)))

    @classmethod
    def load(cls, x: str, lora: dict, alpha: float, dora_scale, loaded_keys: set | None = None
             ) -> TriLoRAAdapter | None:
        names = (x + SUFFIX_U, x + SUFFIX_S, x + SUFFIX_VT)
        if names[0] not in lora:
            return None
        missing = [n for n in names if n not in lora]
        if missing:
            raise ValueError(f"TriLoRA layer {x} is incomplete: missing {', '.join(missing)}")
        u, s, vt = (lora[n] for n in names)
        if u.ndim != 2 or s.ndim != 1 or vt.ndim < 2 or not (u.shape[1] == s.shape[0] == vt.shape[0]):
            raise ValueError(f"TriLoRA layer {x} has inconsistent shapes: trilora_u {list(u.shape)}, "
                             f"trilora_s {list(s.shape)}, trilora_vt {list(vt.shape)}")
        keys = set(loaded_keys or ()) | set(names)
        return cls(keys, (u, s, vt, float(alpha) if alpha is not None else float(s.shape[0])))

    @property
    def layer(self) -> TriLoRALayer:
        u, s, vt, alpha = self.weights
        return TriLoRALayer(u, s, vt, alpha)

    def to_train(self) -> TriLoRATrainDiff:
        return TriLoRATrainDiff(*self.weights)

    @classmethod
    def create_train(cls, weight, rank=1, alpha=1.0) -> TriLoRATrainDiff:
        # ComfyUI's trainer seeds the global generator; draw from it for its runs to be repeatable.
        generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
        layer = init_layer(tuple(weight.shape), rank, generator, alpha=alpha, device=weight.device)
        return TriLoRATrainDiff(layer.u, layer.s, layer.vt, layer.alpha)

    def calculate_shape(self, key):
        return None

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        u, s, vt, alpha = self.weights
        try:
            up = weighted_up(u, s, strength * alpha / s.shape[0], weight.device, intermediate_dtype)
            down = comfy.model_management.cast_to_device(vt, weight.device, intermediate_dtype)
            delta = torch.mm(up, down.flatten(1)).reshape(weight.shape)
            weight += function(delta.type(weight.dtype))
        except Exception as e:  # same contract as ComfyUI's own adapters: log, leave weight as is
            logging.error(f"TriLoRA: could not patch {key}: {e}")
        return weight

    def h(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        u, s, vt, alpha = self.weights
        scale = getattr(self, "multiplier", 1.0) * alpha / s.shape[0]
        up = weighted_up(u, s, scale, x.device, x.dtype)
        down = comfy.model_management.cast_to_device(vt, x.device, x.dtype)
        return bypass_delta(x, up, down, getattr(self, "is_conv", False), getattr(self, "conv_dim", 0),
                            getattr(self, "kw_dict", {}))

    def g(self, y: torch.Tensor) -> torch.Tensor:
        return y


class TriLoRATrainDiff(WeightAdapterTrainBase):
    """A trainable TriLoRA layer for ComfyUI's weight-wrapper training (its own TrainLoraNode
    uses this through `create_train`). Parameter names are the file's suffixes, so a state
    dict of these modules is a TriLoRA file."""

    def __init__(self, u, s, vt, alpha):
        super().__init__()
        # Dense row-major copies: LAPACK's Q comes column-major, and safetensors (ComfyUI's Save
        # LoRA, the pack's checkpoints) stores only contiguous tensors.
        self.trilora_u, self.trilora_s, self.trilora_vt = (
            torch.nn.Parameter(t.detach().to(torch.float32, memory_format=torch.contiguous_format, copy=True))
            for t in (u, s, vt))
        self.alpha = torch.nn.Parameter(torch.tensor(float(alpha)), requires_grad=False)
        # A Python number: no tensor ops (and no device sync) per forward for a fixed factor.
        self.scale = float(alpha) / self.trilora_s.shape[0]

    # rank_mask: None, or [batch, r] set by the trainer around one forward and backward (T-LoRA's
    # timestep masking); where a layer sees another batch size (or has no hook), the union applies.
    rank_mask = None

    def __call__(self, w):
        s = self.trilora_s if self.rank_mask is None else self.trilora_s * self.rank_mask.amax(0)
        up = self.trilora_u * (s * self.scale)
        delta = (up.to(w.dtype) @ self.trilora_vt.to(w.dtype).flatten(1)).reshape(w.shape)
        return w + delta

    def h(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        up = self.trilora_u * (self.trilora_s * (self.scale * getattr(self, "multiplier", 1.0)))
        mask = self.rank_mask
        if mask is None:
            return bypass_delta(x, up.to(x.dtype), self.trilora_vt.to(x.dtype), self.is_conv, self.conv_dim,
                                self.kw_dict)
        if mask.shape[0] != x.shape[0]:
            mask = mask.amax(0, keepdim=True).expand(x.shape[0], -1)
        return masked_bypass_delta(x, up.to(x.dtype), self.trilora_vt.to(x.dtype), mask.to(x.device, x.dtype),
                                   self.is_conv, self.conv_dim, self.kw_dict)

    def g(self, y: torch.Tensor) -> torch.Tensor:
        return y

    def passive_memory_usage(self):
        return sum(p.numel() * p.element_size() for p in self.parameters())


def register() -> None:
    """Adds TriLoRA to ComfyUI's adapter registries once (the pack may be imported twice)."""
    import comfy.weight_adapter as registry

    if TriLoRAAdapter not in registry.adapters:
        registry.adapters.append(TriLoRAAdapter)
    registry.adapter_maps.setdefault("TriLoRA", TriLoRAAdapter)
