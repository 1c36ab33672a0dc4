"""The picture-level base of `make bench-method`: the drawing model `make setup` builds
(harness/fixtures/drawing.py: an SD1.5 checkpoint whose UNet draws captioned flat shapes and
whose VAE keeps flat colours), personalised on the demo's sample style (workflows/sample_style:
8 pictures at 128 px with their captions, a thick black frame the base never saw), and measured
on pictures it generates, as a user looks at them:

- style fit on held-out prompts (`heldout_pic`): how far the mean frame contrast
  (harness.picture_stats.frame_contrast) of pictures generated from style prompts not among the
  training captions is from the sample pictures' own; lower is better, 0 is the style's frame;
- the same on the first few training captions (`train_pic`), so gap growth is defined as for latents;
- drift (`drift_pic`): the mean squared change, in pixels in [0, 1], of the pictures generated
  from the base model's own captions (no trigger word), against the untouched model's pictures
  from the same noise;
- content (`content_pic`): the RGB distance of the large shape's region to the colour the
  held-out prompt names (picture_stats.colour_distance), and `content_kept`, the share of held-out
  pictures whose region is nearest to that colour.

Pictures are sampled as the generate workflow does (Euler, normal schedule, cfg 7, its negative
prompt) in fewer steps (``sample_steps``; the demo's 12 and the workflow's 25 draw about the same
pictures more slowly), from fixed noise per prompt, by ComfyUI's own Euler
(comfy.k_diffusion.sampling.sample_euler) on the BaseModel the trainer is training (its adapters
attached), and decoded by the checkpoint's VAE. ComfyUI must be started first (harness.host).
"""
from __future__ import annotations

from pathlib import Path

from . import picture_stats
from .fixtures import drawing, sample_images

CFG = 7.0
NEGATIVE = "photo, realistic, blurry, text, watermark"  # the generate workflow's
SIZE = drawing.SIZE        # 128 px, the size the drawing model was trained at


def style_prompt(combo) -> str:
    """A prompt in the sample style's caption form for a (big, shape, small, shape, background) combo."""
    return f"{sample_images.TRIGGER}, {drawing.base_caption(*combo)}, thick black frame"


class PictureBase:
    """The drawing model loaded once, its training set and prompts encoded once, and the base
    model's own pictures of the drift prompts; `measure(base_model)` generates and measures."""

    def __init__(self, host, checkpoint: Path, sample_steps: int, heldout: int, train: int, base: int):
        """``heldout``, ``train``, ``base``: how many prompts of each kind are generated."""
        torch = self.torch = host.torch
        self.sample_steps = sample_steps
        import comfy.sd

        # Outside inference mode, as the latent bases are built: TrainLoraNode's gradient
        # checkpointing cannot save inference tensors (the weights) for backward.
        with torch.no_grad():
            self.model, self.clip, self.vae = comfy.sd.load_checkpoint_guess_config(str(checkpoint))[:3]
        self.base = self.model.model
        files = sorted(sample_images.OUT.glob("*.png"))
        captions = [f.with_suffix(".txt").read_text().strip() for f in files]
        pictures = drawing.sample_style_pictures(SIZE)  # [8, 3, H, W] in [0, 1]
        new = [c for c in drawing.caption_pool() if style_prompt(c) not in captions][:heldout]
        self.heldout_colours = [c[0] for c in new]
        base_prompts = [drawing.base_caption(*c) for c in drawing.caption_pool()[1:1 + base]]
        with torch.no_grad():
            self.latents = [{"samples": self.vae.encode(pictures[i:i + 1].permute(0, 2, 3, 1))}
                            for i in range(len(pictures))]
            self.positive = [self.encode(c) for c in captions]
            self.prompts = {"heldout": [style_prompt(c) for c in new], "train": captions[:train], "base": base_prompts}
            self.cond = {k: torch.cat([self.encode(p)[0][0] for p in v]) for k, v in self.prompts.items()}
            self.uncond = self.encode(NEGATIVE)[0][0]
        g = torch.Generator().manual_seed(4242)
        n = sum(len(v) for v in self.prompts.values())
        self.noise = torch.randn(n, 4, SIZE // 8, SIZE // 8, generator=g)
        self.sample_contrast = float(sum(picture_stats.frame_contrast(p) for p in pictures) / len(pictures))
        # the untouched model's pictures: the drift reference and, scored, step 0 of every curve
        self.reference = self.generate(self.base)
        self.start = self.score(self.reference)

    def encode(self, text: str):
        """CLIPTextEncode's CONDITIONING for ``text``."""
        return self.clip.encode_from_tokens_scheduled(self.clip.tokenize(text))

    def generate(self, base) -> dict:
        """{set name: [N, 3, H, W] pictures in [0, 1]} from the fixed noise, with ``base`` (a BaseModel)
        as it is now, adapters attached or not."""
        import comfy.k_diffusion.sampling as kd
        import comfy.samplers

        torch = self.torch
        ms = base.model_sampling
        sigmas = comfy.samplers.calculate_sigmas(ms, "normal", self.sample_steps).float()
        cond = torch.cat([self.cond[k] for k in ("heldout", "train", "base")])
        uncond = self.uncond.expand(len(cond), -1, -1)

        def denoise(x, sigma, **_):
            both = base.apply_model(torch.cat([x, x]), torch.cat([sigma, sigma]),
                                    c_crossattn=torch.cat([cond, uncond])).float()
            c, u = both.chunk(2)
            return u + CFG * (c - u)

        with torch.no_grad():
            latent = kd.sample_euler(denoise, self.noise * sigmas[0], sigmas, disable=True)
            pixels = self.vae.decode(base.process_latent_out(latent)).movedim(-1, 1).clamp(0, 1).float()
        out, i = {}, 0
        for k in ("heldout", "train", "base"):
            out[k] = pixels[i:i + len(self.prompts[k])]
            i += len(self.prompts[k])
        return out

    def measure(self, base) -> dict:
        """The figures of the module docstring for ``base`` as it is now."""
        return self.score(self.generate(base))

    def score(self, pics: dict) -> dict:
        """The figures of the module docstring for pictures ``generate`` made."""
        out = {}
        for name in ("heldout", "train"):
            contrast = sum(picture_stats.frame_contrast(p.numpy()) for p in pics[name]) / len(pics[name])
            out[f"{name}_pic"] = abs(contrast - self.sample_contrast)
            out[f"{name}_frame"] = contrast
        out["drift_pic"] = float((pics["base"] - self.reference["base"]).square().mean())
        distances = [picture_stats.colour_distance(to_image(p), c) for p, c in zip(pics["heldout"],
                                                                                  self.heldout_colours, strict=True)]
        out["content_pic"] = sum(d["distance"] for d in distances) / len(distances)
        out["content_kept"] = sum(d["nearest"] == c for d, c in zip(distances, self.heldout_colours, strict=True)) \
            / len(distances)
        return out


def to_image(picture):
    """[3, H, W] in [0, 1] -> PIL image."""
    from PIL import Image

    return Image.fromarray((picture.permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype("uint8"))
