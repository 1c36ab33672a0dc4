"""Previews while Train TriLoRA trains: every preview_every steps, a latent sampled from fixed noise
(the size of the smallest training latent) with its caption and the adapter as it is (strength 1): Euler on the model's own
schedule, PREVIEW_STEPS steps, cfg 1 (the trainer's guider has the positive prompt only).

ComfyUI shows it as the node's live preview through its ProgressBar, decoded by latent_preview's
previewer (no VAE): the method ComfyUI is set to (--preview-method), else Latent2RGB, since
preview_every is the trainer's own request (0 turns it off). Listeners (the command line) get the
latent itself, after process_latent_out, to decode with the VAE and save."""
from __future__ import annotations

import comfy.samplers
import comfy.utils
import latent_preview
import torch

from ...trilora_core import generator

PREVIEW_STEPS = 8
PREVIEW_SEED = 20251  # the same noise in every preview and run


def _previewer(device, latent_format):
    found = latent_preview.get_previewer(device, latent_format)
    if found is None and getattr(latent_format, "latent_rgb_factors", None) is not None:
        found = latent_preview.Latent2RGBPreviewer(latent_format.latent_rgb_factors,
                                                   getattr(latent_format, "latent_rgb_factors_bias", None),
                                                   getattr(latent_format, "latent_rgb_factors_reshape", None))
    return found


class Previews:
    """``start`` once the guider has run; ``after_step`` after every update."""

    def __init__(self, every: int, steps: int, listeners: list):
        self.every, self.steps, self.listeners = every, steps, listeners
        self.count = 0

    def start(self, base, conds, device, shape) -> None:
        """``conds``: the processed cond entries of the caption, for latents of ``shape``."""
        self.base, self.device, self.conds = base, device, conds
        self.noise = torch.randn(shape, generator=generator(PREVIEW_SEED, "preview"))
        self.bar = comfy.utils.ProgressBar(self.steps)
        self.previewer = _previewer(device, base.latent_format) if self.bar.hook is not None else None

    def due(self, k: int) -> bool:
        """After the (k+1)-th update of this run, when anyone looks (a progress hook or a listener)."""
        return self.every > 0 and (k + 1) % self.every == 0 and (self.previewer is not None or bool(self.listeners))

    def sample(self, trainer, model_wrap, extra_args) -> torch.Tensor:
        """The sampled latent in the model's space ([1, C, ...], float32, on the device)."""
        ms = model_wrap.inner_model.model_sampling
        sigmas = comfy.samplers.calculate_sigmas(ms, "simple", PREVIEW_STEPS).to(self.device)
        noise = self.noise.to(self.device)
        x = ms.noise_scaling(sigmas[:1], noise, torch.zeros_like(noise), True)
        model_wrap.conds["positive"] = self.conds
        autocast = torch.autocast(self.device.type, dtype=trainer.dtype, enabled=trainer.dtype != torch.float32)
        with torch.no_grad(), autocast:
            for sigma, following in zip(sigmas[:-1], sigmas[1:], strict=True):
                denoised = model_wrap(x, sigma.reshape(1), **extra_args).float()
                x = denoised if following == 0 else x + (x - denoised) / sigma * (following - sigma)
        return x

    def after_step(self, trainer, model_wrap, extra_args, k: int, steps_done: int) -> None:
        if not self.due(k):
            return
        latent = self.sample(trainer, model_wrap, extra_args)
        self.count += 1
        if self.previewer is not None:
            self.bar.update_absolute(k + 1, self.steps, self.previewer.decode_latent_to_preview_image("JPEG", latent))
        for listener in self.listeners:
            listener(steps_done, {"preview": self.base.process_latent_out(latent).cpu()})
