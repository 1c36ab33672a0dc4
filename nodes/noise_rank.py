"""T-LoRA's noise-level rank at sampling: a file trained with ``timestep_min_rank`` records the
schedule (trilora_core.timestep_rank), and its diffusion-model layers are applied so that at each
model call sample b uses only the first r(t_b) directions of s, the mask training used, with t_b
the sample's noise level.

ComfyUI's mechanisms for it: a PatcherInjection puts a forward hook on each adapted layer (added
while the model is patched, removed when it is unpatched or another clone takes the model), and an
APPLY_MODEL wrapper hands the hooks each call's sigmas. The hook adds the low-rank path
x -> Vt -> mask -> U diag(s) (alpha/r) strength to the layer's output, which is exact per sample
and cheap (r numbers per token), needs no re-patching of weights over sampling, and works on a
partially loaded (low-VRAM) model as on a full one, since the factors go to the input's device.

The trainer draws noise level t and uses sigma = percent_to_sigma(1 - t); so direction band k,
active from sampling percent p_k on (band_starts), is active exactly where sigma <=
percent_to_sigma(p_k)."""
from __future__ import annotations

import uuid

import comfy.patcher_extension
import comfy.utils
import torch

from ..trilora_core import band_starts
from .adapter import masked_bypass_delta

KEY = "trilora_noise_rank"


def band_sigmas(model_sampling, rank: int, schedule: tuple[int, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma thresholds [bands], direction counts [bands]) of the schedule on this model: a
    sample at sigma uses the count of the last band whose threshold is >= sigma."""
    starts = band_starts(rank, *schedule)
    return (torch.tensor([float(model_sampling.percent_to_sigma(p)) if p > 0 else float("inf") for _, p in starts]),
            torch.tensor([k for k, _ in starts]))


class NoiseRankLayers:
    """The hooks of one model clone: {state-dict weight key: (TriLoRALayer, strength)}."""

    def __init__(self, model_patcher, layers: dict, schedule: tuple[int, float]):
        self.layers, self.schedule, self.sigmas, self.handles = layers, schedule, None, []
        ms = model_patcher.model.model_sampling
        self.bands = {layer.rank: band_sigmas(ms, layer.rank, schedule) for layer, _ in layers.values()}
        self.cache: dict = {}  # (key, device, dtype) -> (up, vt): the factors where the inputs are

    def mask(self, rank: int, n: int, device) -> torch.Tensor:
        """[n, rank] of 0/1 for this call's samples (every direction outside a sampler's call)."""
        if self.sigmas is None:
            return torch.ones(n, rank, device=device)
        thresholds, counts = self.bands[rank]
        sig = self.sigmas.float().cpu().reshape(-1)
        active = counts[(thresholds[None, :] >= sig[:, None]).sum(1) - 1]  # band 0's threshold is inf
        mask = (torch.arange(rank)[None, :] < active[:, None]).float()
        if n != mask.shape[0]:  # a model that folds frames/tokens into the batch: rows per sample
            if n % mask.shape[0]:
                raise ValueError(f"TriLoRA noise-level rank: a layer saw batch {n} for {mask.shape[0]} sigmas")
            mask = mask.repeat_interleave(n // mask.shape[0], 0)
        return mask.to(device)

    def factors(self, key: str, x: torch.Tensor):
        found = self.cache.get((key, x.device, x.dtype))
        if found is None:
            layer, strength = self.layers[key]
            up = layer.u.float() * (layer.s.float() * (strength * layer.alpha / layer.rank))
            found = (up.to(x.device, x.dtype), layer.vt.to(x.device, x.dtype))
            self.cache = {k: v for k, v in self.cache.items() if k[1:] == (x.device, x.dtype)}
            self.cache[(key, x.device, x.dtype)] = found
        return found

    def hook(self, key: str, module):
        is_conv = isinstance(module, torch.nn.modules.conv._ConvNd)
        kw = {n: getattr(module, n) for n in ("stride", "padding", "dilation")} if is_conv else {}
        conv_dim = module.weight.ndim - 2

        def forward_hook(mod, args, out):
            x = args[0]
            up, vt = self.factors(key, x)
            return out + masked_bypass_delta(x, up, vt, self.mask(vt.shape[0], x.shape[0], x.device).to(x.dtype),
                                             is_conv, conv_dim, kw)
        return forward_hook

    def inject(self, model_patcher) -> None:
        for key in self.layers:
            module = comfy.utils.get_attr(model_patcher.model, key.rsplit(".", 1)[0])
            self.handles.append(module.register_forward_hook(self.hook(key, module)))

    def eject(self, model_patcher) -> None:
        while self.handles:
            self.handles.pop().remove()
        self.cache = {}

    def apply_model(self, executor, x, t, *args, **kwargs):
        self.sigmas = t
        try:
            return executor(x, t, *args, **kwargs)
        finally:
            self.sigmas = None


def hookable(model, key) -> bool:
    """Whether a patch key is a whole Linear/Conv weight (not a slice of a fused one)."""
    if not isinstance(key, str) or not key.endswith(".weight"):
        return False
    module = comfy.utils.get_attr(model, key.rsplit(".", 1)[0])
    return isinstance(module, (torch.nn.Linear, torch.nn.modules.conv._ConvNd)) and getattr(module, "groups", 1) == 1


def add_noise_rank(clone, layers: dict, schedule: tuple[int, float]) -> None:
    """Puts ``layers`` ({weight key: (TriLoRALayer, strength)}) on ``clone`` (a ModelPatcher) with
    the schedule's noise-level mask."""
    hooks = NoiseRankLayers(clone, layers, schedule)
    key = f"{KEY}_{uuid.uuid4().hex}"  # one per application: chained files each keep theirs
    clone.set_injections(key, [comfy.patcher_extension.PatcherInjection(hooks.inject, hooks.eject)])
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, key, hooks.apply_model)
