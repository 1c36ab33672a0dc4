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

from ..trilora_core import TriLoRALayer, init_layer

SUFFIX_U, SUFFIX_S, SUFFIX_VT = ".trilora_u", ".trilora_s", ".trilora_vt"
HALF_DTYPES = (torch.float16, torch.bfloat16)


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


class _LowRankAddLinear(torch.autograd.Function):
    """base_out + x Vt^T (U diag(s) scale)^T for a linear layer, as ONE autograd node.

    Written out by hand for speed (issue 8, see BENCHMARKS.md): the add is fused into the GEMM
    (addmm), the factors' gradients are formed here instead of by five autograd nodes, and every
    small GEMM is laid out with the rank as its first dimension ([r, N] rather than [N, r]):
    on the CPU the [N, r] forms (g @ U, g^T @ h) run about 3x slower than their transposes.
    Same math as ``bypass_delta`` (tests compare the two), in the dtype of ``base_out``."""

    @staticmethod
    def forward(ctx, base_out, x, u, s, vt, scale):
        dtype = base_out.dtype
        sc = s * scale
        up = (u * sc).to(dtype)  # [out, r]
        vt2 = vt.flatten(1).to(dtype)  # [r, in]
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)  # [N, in]
        h_t = vt2 @ x2.t()  # [r, N]
        out = torch.addmm(base_out.reshape(-1, base_out.shape[-1]), h_t.t(), up.t())
        ctx.save_for_backward(x2, h_t, u, sc, vt2, up, scale)
        ctx.x_shape, ctx.vt_shape = x.shape, vt.shape
        return out.view(base_out.shape)

    @staticmethod
    def backward(ctx, grad):
        x2, h_t, u, sc, vt2, up, scale = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])  # [N, out]
        gh_t = up.t() @ g2.t()  # [r, N]
        d_up = (h_t @ g2).t().to(u.dtype)  # [out, r]
        grad_x = (gh_t.t() @ vt2).view(ctx.x_shape) if ctx.needs_input_grad[1] else None
        d_vt = (gh_t @ x2).view(ctx.vt_shape)
        return grad, grad_x, d_up * sc, (d_up * u).sum(0) * scale, d_vt, None


class _LowRankAddConv(torch.autograd.Function):
    """base_out + conv(conv(x, Vt), U diag(s) scale) for a conv layer, as ONE autograd node (see
    _LowRankAddLinear). 1x1 convs (stride 1, no padding) run as channel GEMMs; others through
    the conv kernels, their two backward convolutions in one convolution_backward call."""

    @staticmethod
    def forward(ctx, base_out, x, u, s, vt, scale, stride, padding, dilation):
        dtype = base_out.dtype
        sc = s * scale
        up = (u * sc).to(dtype)  # [out, r]
        vtc = vt.to(dtype)  # [r, in, *kernel]
        x = x.to(dtype)
        batch, rank = x.shape[0], vt.shape[0]
        pointwise = all(k == 1 for k in vt.shape[2:]) and all(v == 1 for v in stride) \
            and not any(padding) and all(v == 1 for v in dilation)
        if pointwise:
            hidden = torch.matmul(vtc.flatten(1), x.reshape(batch, x.shape[1], -1))  # [B, r, L]
        else:
            conv = (F.conv1d, F.conv2d, F.conv3d)[vt.ndim - 3]
            hidden = conv(x, vtc, None, stride, padding, dilation)
        hidden3 = hidden.reshape(batch, rank, -1)
        out = torch.baddbmm(base_out.reshape(batch, up.shape[0], -1), up.expand(batch, *up.shape), hidden3)
        ctx.save_for_backward(x, hidden3, u, sc, vtc, up, scale)
        ctx.conf = (stride, padding, dilation, pointwise, hidden.shape)
        return out.view(base_out.shape)

    @staticmethod
    def backward(ctx, grad):
        x, hidden3, u, sc, vtc, up, scale = ctx.saved_tensors
        stride, padding, dilation, pointwise, hidden_shape = ctx.conf
        batch = x.shape[0]
        g3 = grad.reshape(batch, grad.shape[1], -1)  # [B, out, L]
        gh = torch.matmul(up.t(), g3)  # [B, r, L]
        d_up = torch.matmul(hidden3, g3.transpose(1, 2)).sum(0).t().to(u.dtype)  # [out, r]
        need_x = ctx.needs_input_grad[1]
        if pointwise:
            vt2 = vtc.flatten(1)
            grad_x = torch.matmul(vt2.t(), gh).view(x.shape) if need_x else None
            d_vt = torch.matmul(gh, x.reshape(batch, x.shape[1], -1).transpose(1, 2)).sum(0).view(vtc.shape)
        else:
            dims = vtc.ndim - 2
            grad_x, d_vt, _ = torch.ops.aten.convolution_backward(
                gh.view(hidden_shape), x, vtc, None, stride, padding, dilation, False, [0] * dims, 1,
                [need_x, True, False])
        return grad, grad_x, d_up * sc, (d_up * u).sum(0) * scale, d_vt, None, None, None, None


def _tuple(value, dims: int) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims


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
        self.trilora_u = torch.nn.Parameter(u.detach().clone().float())
        self.trilora_s = torch.nn.Parameter(s.detach().clone().float())
        self.trilora_vt = torch.nn.Parameter(vt.detach().clone().float())
        self.alpha = torch.nn.Parameter(torch.tensor(float(alpha)), requires_grad=False)

    @property
    def scale(self) -> torch.Tensor:
        return self.alpha / self.trilora_s.shape[0]

    def __call__(self, w):
        up = self.trilora_u * (self.trilora_s * self.scale)
        delta = (up.to(w.dtype) @ self.trilora_vt.to(w.dtype).flatten(1)).reshape(w.shape)
        return w + delta

    def h(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        up = self.trilora_u * (self.trilora_s * (self.scale * getattr(self, "multiplier", 1.0)))
        return bypass_delta(x, up.to(x.dtype), self.trilora_vt.to(x.dtype), self.is_conv, self.conv_dim,
                            self.kw_dict)

    def g(self, y: torch.Tensor) -> torch.Tensor:
        return y

    def add_bypass(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """``base_out + h(x, base_out)`` through the fused one-node path (TrainTriLoRA's hooks):
        the same result, faster (see _LowRankAddLinear)."""
        # A 0-d tensor, not float(alpha): reading a GPU scalar per layer would sync every forward.
        scale = self.alpha * (getattr(self, "multiplier", 1.0) / self.trilora_s.shape[0])
        if not self.is_conv:
            return _LowRankAddLinear.apply(base_out, x, self.trilora_u, self.trilora_s, self.trilora_vt, scale)
        kw = self.kw_dict
        dims = self.conv_dim
        return _LowRankAddConv.apply(base_out, x, self.trilora_u, self.trilora_s, self.trilora_vt, scale,
                                     _tuple(kw.get("stride", 1), dims), _tuple(kw.get("padding", 0), dims),
                                     _tuple(kw.get("dilation", 1), dims))

    def passive_memory_usage(self):
        return sum(p.numel() * p.element_size() for p in self.parameters())


def register() -> None:
    """Adds TriLoRA to ComfyUI's adapter registries once (the pack may be imported twice)."""
    import comfy.weight_adapter as registry

    if TriLoRAAdapter not in registry.adapters:
        registry.adapters.append(TriLoRAAdapter)
    registry.adapter_maps.setdefault("TriLoRA", TriLoRAAdapter)
