"""What TrainTriLoRA does differently per model family, as kohya sd-scripts, ai-toolkit and
musubi-tuner do: the timestep sampling, Flux's distilled guidance, video latents, and the
model conditioning of images of different sizes (SDXL's size conditioning).

- Timestep sampling ("auto"): flow-matching models (ComfyUI model_sampling CONST: Flux, SD3.5,
  Wan, Qwen-Image, Lumina 2, Z-Image, HunyuanVideo ...) draw logit-normal noise levels mapped
  through the model's own shifted schedule, which is kohya's ``--timestep_sampling shift`` at
  the model's shift (for Flux dev exp(1.15) = 3.1582, the value kohya's Flux guide recommends)
  and SD3's logit-normal training; eps and v models (SD1.5, SDXL) draw uniformly over their
  1000 steps, as kohya and ComfyUI's TrainLoraNode do. A ModelSamplingSD3 / ModelSamplingFlux /
  ModelSamplingAuraFlow node in front of TrainTriLoRA changes the shift trained with.
- Guidance: a guidance-distilled model (Flux dev, HunyuanVideo: a ``guidance_in`` embedder)
  trains with the guidance kohya's Flux guide and musubi-tuner use, 1.0, unless the caption's
  conditioning carries one (a FluxGuidance node), which is kept.
- Latents: a video model (latent_format.latent_dimensions 3: Wan, Qwen-Image, HunyuanVideo)
  takes [batch, C, frames, H, W]; an image latent [batch, C, H, W] trains as a one-frame video
  (as ComfyUI samples it, and as musubi-tuner trains Wan on images). Latents of other frame
  counts or sizes train in separate forward passes. Latents whose channels are not the model's
  are refused.
- Gradient checkpointing: ComfyUI's Flux blocks (Flux, Chroma, HunyuanVideo) add their
  residuals in place after a norm kept the input for the backward pass, so they train only
  with recomputed activations: checkpointing stays on for them.
- Model conditioning: ComfyUI computes a caption's model inputs (SDXL's pooled output and size
  embedding, Flux's guidance ...) for one latent size; latents of other sizes get them computed
  for their own size, as kohya passes each bucket's size to SDXL.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import comfy.model_sampling
import comfy.sample
import comfy.samplers
import torch

from ..families import family_of

log = logging.getLogger("comfyui-trilora")

AUTO = "auto"
DEFAULT_GUIDANCE = 1.0


def is_flow(model_sampling) -> bool:
    """True for rectified-flow models (ComfyUI's CONST prediction: x_t = (1 - sigma) x0 + sigma noise)."""
    return isinstance(model_sampling, comfy.model_sampling.CONST)


def takes_guidance(model_patcher) -> bool:
    """True when the diffusion model embeds a distilled guidance value (Flux dev, HunyuanVideo)."""
    embedder = getattr(model_patcher.model.diffusion_model, "guidance_in", None)
    return isinstance(embedder, torch.nn.Module) and not isinstance(embedder, torch.nn.Identity)


@dataclass(frozen=True)
class FamilySettings:
    """The family choices of one run, with "auto" resolved."""

    timestep_sampling: str
    flow_shift: float | None  # the model's shift, for flow models
    guidance: float | None  # None: the model takes no guidance
    checkpointing: bool  # gradient checkpointing, on where the family's blocks need it
    loss_weighting: str = "none"  # over noise levels (trilora_core/loss_weighting.py)

    @classmethod
    def resolve(cls, model_patcher, timestep_sampling: str, guidance: float, checkpointing: bool,
                loss_weighting: str = "none") -> FamilySettings:
        ms = model_patcher.get_model_object("model_sampling")
        flow = is_flow(ms)
        if timestep_sampling == AUTO:
            timestep_sampling = "logit_normal" if flow else "uniform"
        if loss_weighting == AUTO:  # x0 where make bench-method measured it (eps); flow: its own objective
            loss_weighting = "none" if flow else "x0"
        shift = float(ms.shift) if flow and hasattr(ms, "shift") else None
        if shift is not None and isinstance(ms, comfy.model_sampling.ModelSamplingFlux):
            shift = math.exp(shift)  # ComfyUI keeps Flux's shift as mu; sigma shifts by exp(mu)
        family = family_of(model_patcher)
        if family.inplace_blocks and not checkpointing:
            log.warning("TriLoRA: %s blocks add in place, which only trains with gradient checkpointing: "
                        "turning it on", family.name)
        return cls(timestep_sampling, shift, float(guidance) if takes_guidance(model_patcher) else None,
                   checkpointing or family.inplace_blocks, loss_weighting)

    def metadata(self) -> dict[str, str]:
        """kohya's metadata names for these choices (``ss_timestep_sampling`` ...)."""
        meta = {"ss_timestep_sampling": self.timestep_sampling}
        if self.flow_shift is not None:
            meta["ss_discrete_flow_shift"] = f"{self.flow_shift:g}"
        if self.guidance is not None:
            meta["ss_guidance_scale"] = f"{self.guidance:g}"
        return meta

    def with_guidance(self, entries: list) -> list:
        """Cond entries [tensor, extra] with the run's guidance where the caption set none."""
        if self.guidance is None:
            return entries
        return [[cond, extra if "guidance" in extra else {**extra, "guidance": self.guidance}]
                for cond, extra in entries]


def fit_latents(images: list[torch.Tensor], model_patcher) -> list[torch.Tensor]:
    """Each [1, C, ...] latent in the layout the model takes, as ComfyUI's samplers fit them
    (comfy.sample.fix_empty_latent_channels: an image latent on a video model gets one frame).
    Raises ValueError naming the latent whose channels or dimensions do not fit."""
    latent_format = model_patcher.get_model_object("latent_format")
    dims, channels = int(latent_format.latent_dimensions), int(latent_format.latent_channels)
    layout = "(channels, frames, height, width)" if dims == 3 else "(channels, height, width)"
    fitted = []
    for n, image in enumerate(images):
        image = comfy.sample.fix_empty_latent_channels(model_patcher, image)
        if image.ndim != dims + 2 or image.shape[1] != channels:
            raise ValueError(f"TrainTriLoRA: latent {n + 1} has shape {list(image.shape[1:])}; this model takes "
                             f"{channels}-channel latents {layout}. Encode the images with this model's VAE.")
        fitted.append(image)
    return fitted


def conds_for_shape(base_model, processed: list[dict], shape: tuple[int, ...], device, seed: int) -> list[dict]:
    """The guider's processed cond entries with their model inputs computed for latents of
    ``shape`` [batch, C, ...] (ComfyUI encodes them once, for the size it sampled)."""
    noise = torch.zeros(shape, device=device)
    return comfy.samplers.encode_model_conds(base_model.extra_conds, [dict(e) for e in processed], noise, device,
                                             "positive", latent_image=noise, seed=seed)
