"""The layers a run adapts and everything put on the shared model while it trains: which Linear/Conv
layers of the diffusion model (``find_targets``), the forward hooks that add each adapter in bypass
form (x -> Vt -> U diag(s)), a weight function for other layers, gradient checkpointing, and their
exact removal (``Attachment.detach``, also on cancel)."""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import comfy.lora
import torch

from ...trilora_core import prefixes_by_weight
from ..families import ATTENTION_NAMES, FEEDFORWARD_NAMES, family_of

ANY_LAYER = "any"  # a resumed file may adapt any weight ComfyUI's key map knows
_CONVS = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


@dataclass
class Target:
    name: str  # module name under the BaseModel, e.g. diffusion_model.input_blocks.1.1...
    module: torch.nn.Module
    prefix: str  # file prefix (kohya name where ComfyUI knows one)
    weight_shape: tuple[int, ...]


def layer_kind_ok(name: str, module: torch.nn.Module, target: str, fused_attention: re.Pattern | None = None) -> bool:
    if target == ANY_LAYER:
        return True
    is_linear = isinstance(module, torch.nn.Linear)
    if target == "all linear+conv":
        return is_linear or isinstance(module, _CONVS)
    if not is_linear:
        return False
    if target == "all linear":
        return True
    if ATTENTION_NAMES.search(name) or (fused_attention is not None and fused_attention.search(name)):
        return True
    return target == "attention+feedforward" and bool(FEEDFORWARD_NAMES.search(name))


def find_targets(model_patcher, target: str) -> list[Target]:
    """The diffusion model's Linear/Conv layers of the chosen kind that ComfyUI's key map
    knows (so the file applies back to the model), sorted by prefix. The attention presets
    include the family's fused attention layers (a Flux single block's linear1 and linear2)."""
    base = model_patcher.model
    fused = family_of(model_patcher).fused_attention
    by_weight = prefixes_by_weight(comfy.lora.model_lora_keys_unet(base, {}))
    found = []
    for name, module in base.named_modules():
        weight = getattr(module, "weight", None)
        key = f"{name}.weight"
        if not isinstance(weight, torch.Tensor) or weight.ndim < 2 or key not in by_weight:
            continue
        if layer_kind_ok(name, module, target, fused):
            found.append(Target(name, module, by_weight[key], tuple(weight.shape)))
    return sorted(found, key=lambda t: t.prefix)


def trainable_alias(tensor: torch.Tensor) -> torch.Tensor:
    """A normal tensor on the same memory as ``tensor``, an inference tensor (the model was loaded
    under the executor's torch.inference_mode), which autograd refuses to save for backward.

    Made once per run, it costs no copy: a clone per forward would copy every weight on every step
    (and keep them all until the backward). Safe because training never writes the base weights
    (frozen, and ComfyUI's models run in eval mode). Tensor subclasses (quantized weights) are
    cloned once."""
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        return tensor.clone()
    alias = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
    return alias.set_(tensor.untyped_storage(), tensor.storage_offset(), tensor.size(), tensor.stride())


def _bypass_hook(adapter, module, args, kwargs, output):
    x = args[0] if args else next(iter(kwargs.values()))
    adapter.calls += 1
    return output + adapter.h(x, output)


class Attachment:
    """Everything put on the shared model for training, and its exact removal."""

    def __init__(self):
        self.handles = []
        self.functions = []  # (list object, function)
        self.swapped = []  # (dict, name, original)
        self.grad_flags = []
        self.forwards = []  # (module, the instance forward it had or None)
        self.own_lists = []  # (module, attribute) lists created here

    def add_function(self, module, attribute: str, fn) -> None:
        if attribute not in module.__dict__:  # never append to a class-level default list
            setattr(module, attribute, list(getattr(module, attribute)))
            self.own_lists.append((module, attribute))
        functions = getattr(module, attribute)
        functions.append(fn)
        self.functions.append((functions, fn))

    def freeze(self, model: torch.nn.Module) -> None:
        for param in model.parameters():
            self.grad_flags.append((param, param.requires_grad))
            param.requires_grad_(False)

    def alias_inference_tensors(self, model: torch.nn.Module) -> None:
        """Swaps the model's inference tensors for trainable aliases (``trainable_alias``)."""
        for module in model.modules():
            for store in (module._parameters, module._buffers):
                for pname, tensor in list(store.items()):
                    if tensor is None or not tensor.is_inference():
                        continue
                    alias = trainable_alias(tensor)
                    store[pname] = torch.nn.Parameter(alias, requires_grad=False) if store is module._parameters else alias
                    self.swapped.append((store, pname, tensor))

    def add_adapter(self, module: torch.nn.Module, adapter) -> None:
        """A forward hook (bypass form) on plain Linear/Conv layers, else the layer's weight function."""
        adapter.calls, adapter.multiplier = 0, 1.0
        plain_conv = isinstance(module, _CONVS) and module.groups == 1 and module.padding_mode == "zeros"
        if isinstance(module, torch.nn.Linear) or plain_conv:
            adapter.is_conv = plain_conv
            adapter.conv_dim = module.weight.ndim - 2
            adapter.kw_dict = ({"stride": module.stride, "padding": module.padding, "dilation": module.dilation}
                               if plain_conv else {})
            self.handles.append(module.register_forward_hook(functools.partial(_bypass_hook, adapter),
                                                             with_kwargs=True))
        elif hasattr(module, "weight_function"):
            adapter.calls = None  # counted only for hooks
            self.add_function(module, "weight_function", adapter)

    def checkpoint(self, model: torch.nn.Module, units: list[torch.nn.Module] | None = None) -> None:
        """Gradient checkpointing on ``units`` (default: the model's highest submodules)."""
        for module in _checkpoint_units(model) if units is None else units:
            self.forwards.append((module, module.__dict__.get("forward")))
            _checkpoint(module)

    def detach(self) -> None:
        """Removes everything, newest first, and leaves the Attachment empty."""
        self._remove_added()
        self._restore_replaced()
        self.__init__()

    def _remove_added(self) -> None:
        for handle in reversed(self.handles):
            handle.remove()
        for functions, fn in reversed(self.functions):
            for i in range(len(functions) - 1, -1, -1):
                if functions[i] is fn:
                    del functions[i]
                    break

    def _restore_replaced(self) -> None:
        for store, name, original in reversed(self.swapped):
            store[name] = original
        for module, previous in reversed(self.forwards):
            if previous is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = previous
        for module, attribute in reversed(self.own_lists):
            if not getattr(module, attribute):
                module.__dict__.pop(attribute, None)
        for param, flag in self.grad_flags:
            # An inference tensor's flag may only be set back inside inference mode.
            with torch.inference_mode(param.is_inference()):
                param.requires_grad_(flag)


def attach(diffusion_model: torch.nn.Module, targets: list[Target], adapters: dict, checkpointing: bool) -> Attachment:
    """Puts the adapters on the target layers of the frozen model (and gradient checkpointing on
    its blocks); on any error, what was attached so far is removed before the error propagates."""
    att = Attachment()
    try:
        att.freeze(diffusion_model)
        att.alias_inference_tensors(diffusion_model)
        for target in targets:
            att.add_adapter(target.module, adapters[target.prefix])
        if checkpointing:
            att.checkpoint(diffusion_model)
    except BaseException:
        att.detach()
        raise
    return att


def _checkpoint_units(model: torch.nn.Module, found=None) -> list[torch.nn.Module]:
    """The highest submodules with a forward (containers are looked into), as ComfyUI's
    TrainLoraNode picks them for gradient checkpointing."""
    found = [] if found is None else found
    for child in model.children():
        if isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential, torch.nn.ModuleDict)):
            _checkpoint_units(child, found)
        else:
            found.append(child)
    return found


def _checkpoint(module: torch.nn.Module) -> None:
    forward = module.forward

    def run(args, kwargs):
        # Blocks that add their residual into their input in place (ComfyUI's Flux blocks:
        # ``img += ...``) get a copy: the recomputation in the backward pass must start from the
        # input as it was, and with the same requires_grad, or its activations (and so the
        # gradients) differ from the forward's.
        args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
        kwargs = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        return forward(*args, **kwargs)

    def checkpointed(*args, **kwargs):
        return torch.utils.checkpoint.checkpoint(run, args, kwargs, use_reentrant=False)

    module.forward = checkpointed
