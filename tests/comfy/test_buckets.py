"""Aspect-ratio buckets in training: a batch draws from one bucket (one latent size), each bucket
trains with the model conditioning ComfyUI computes for its own size (SDXL's size conditioning,
Flux's and SD3's positional ids), and buckets from Load Training Images (TriLoRA) and from
ComfyUI's Resolution Bucket train the same way. Real ComfyUI, the tiny models of each family."""
from __future__ import annotations

import comfy.sampler_helpers
import comfy.samplers
import pytest
import torch
from comfy_extras.nodes_custom_sampler import Guider_Basic
from conftest import run_node
from PIL import Image
from test_dataset_chain import resolution_bucket
from tiny_models import tiny_model

from harness.host import pack_module

SQUARE, WIDE = (8, 8), (8, 12)  # latent sizes of the two buckets (64 x 64 and 96 x 64 px)


def bucketed_data(family) -> tuple[list[dict], list[list]]:
    """4 single-image LATENTs, two square and two wide (two buckets, square first), a caption each."""
    shapes = [SQUARE, WIDE, SQUARE, WIDE]
    lead = family.latent_shape()[:-2]
    latents = [{"samples": torch.randn(*lead, *hw, generator=torch.Generator().manual_seed(i))}
               for i, hw in enumerate(shapes)]
    conds = [family.conditioning(seed=10 + i) for i in range(4)]
    if family.name == "flux-dev":  # the guidance the trainer would add, set on the caption itself
        conds = [[[c, {**extra, "guidance": 1.0}] for c, extra in cond] for cond in conds]
    return latents, conds


def train_loss(comfy_host, model, latents, conds, seed: int, steps: int = 1, batch_size: int = 2) -> list[float]:
    inputs = {"steps": [steps], "rank": [2], "training_dtype": ["fp32"], "gradient_checkpointing": [False],
              "batch_size": [batch_size], "seed": [seed], "learning_rate": [1e-3], "loss_weighting": ["none"]}
    with torch.inference_mode():
        return run_node(comfy_host, "TrainTriLoRA", model=[model], latents=latents, positive=conds, **inputs)[2]["loss"]


class _ModelError(comfy.samplers.Sampler):
    """The error of the model's own prediction (eps, flow ...) for one latent at one noise level, as
    ComfyUI's guider conditions a sampling of that latent's size."""

    def __init__(self, sigma, x0, out):
        self.sigma, self.x0, self.out = sigma, x0, out

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        ms = model_wrap.inner_model.model_sampling
        xt = ms.noise_scaling(self.sigma, noise.clone(), self.x0, False)
        coeff = ms.calculate_denoised(self.sigma, torch.ones_like(self.x0), torch.zeros_like(self.x0))
        self.out.append(((model_wrap(xt, self.sigma, **extra_args) - self.x0) / coeff).square().mean().item())
        return torch.zeros_like(latent_image)


def first_step_reference(comfy_host, family, latents, conds, seed: int) -> tuple[list[int], float]:
    """(step 1's batch, its loss) computed the way a user samples: ComfyUI's guider at each
    image's own size, the trainer's noise levels and noise drawn from the seed."""
    core, model = comfy_host.core, family.model
    buckets = core.group_buckets([tuple(lat["samples"].shape) for lat in latents])
    batch = core.bucket_batch(seed, buckets, 2, 0)
    gen = core.generator(seed, "noise", 0, 0)
    sampling = "uniform" if family.objective in ("eps", "v") else "logit_normal"
    levels = core.timesteps.sample_noise_levels(sampling, len(batch), gen)
    noises = [torch.randn(latents[i]["samples"].shape, generator=gen) for i in batch]
    ms = model.get_model_object("model_sampling")
    errors: list[float] = []
    with torch.inference_mode():
        for i, level, noise in zip(batch, levels, noises, strict=True):
            sigma = torch.tensor([float(ms.percent_to_sigma(1.0 - float(level)))])
            x0 = model.model.process_latent_in(latents[i]["samples"])
            guider = Guider_Basic(model)
            guider.set_conds(conds[i])
            guider.sample(noise, torch.zeros_like(noise), _ModelError(sigma, x0, errors), torch.tensor([1.0, 0.0]),
                          seed=seed)
    return batch, sum(errors) / len(errors)


@pytest.mark.parametrize("name", ["sd15", "sdxl", "sd3.5", "flux-dev"])
def test_each_bucket_trains_with_the_conditioning_of_its_own_size(comfy_host, name):
    family = tiny_model(name)
    latents, conds = bucketed_data(family)
    core = comfy_host.core
    buckets = core.group_buckets([tuple(lat["samples"].shape) for lat in latents])
    # A seed whose first batch is the wide bucket: ComfyUI's guider prepares the captions for the
    # first latent's (square) size, so this batch takes the conditioning made for its own size.
    seed = next(s for s in range(100) if core.bucket_batch(s, buckets, 2, 0)[0] in (1, 3))
    batch, want = first_step_reference(comfy_host, family, latents, conds, seed)
    assert sorted(batch) == [1, 3]  # one bucket, both its images: one forward pass
    # SDXL: y holds the size (conditioning made for the square size fails here); Flux and SD3 compute
    # their positional ids from the latent in the forward: the wide latent must reach it whole.
    assert train_loss(comfy_host, family.model, latents, conds, seed) == [pytest.approx(want, rel=1e-4)]


def test_sdxl_size_conditioning_differs_between_the_buckets(comfy_host):
    # What the test above would miss if SDXL ignored the size: its vector input y holds it.
    family = tiny_model("sdxl")
    model, cond = family.model, family.conditioning()
    family_module = pack_module(comfy_host, "nodes.training.family")
    base = model.model
    processed = comfy.sampler_helpers.convert_cond(cond)
    with torch.inference_mode():
        square = family_module.conds_for_shape(base, processed, (1, 4, *SQUARE), "cpu", 0)[0]["model_conds"]["y"].cond
        wide = family_module.conds_for_shape(base, processed, (1, 4, *WIDE), "cpu", 0)[0]["model_conds"]["y"].cond
    assert square.shape == wide.shape and not torch.equal(square, wide)


def test_a_batch_draws_from_one_bucket_every_step(comfy_host, caplog):
    family = tiny_model("sd15")
    latents, conds = bucketed_data(family)
    latents.append({"samples": torch.randn(1, 4, 12, 8, generator=torch.Generator().manual_seed(9))})  # a tall one
    conds.append(family.conditioning(seed=20))
    seen = []
    trainer = pack_module(comfy_host, "nodes.training.trainer")
    original = trainer.ForwardBatches.groups

    def groups(self, batch, share=None):
        seen.append([tuple(self.images[i].shape) for i in batch])
        return original(self, batch, share)

    trainer.ForwardBatches.groups = groups
    try:
        with caplog.at_level("WARNING", logger="comfyui-trilora"):
            losses = train_loss(comfy_host, family.model, latents, conds, seed=3, steps=6)
    finally:
        trainer.ForwardBatches.groups = original
    assert len(losses) == 6 and len(seen) == 6
    assert all(len(set(shapes)) == 1 for shapes in seen)  # one size per batch
    assert sorted(len(s) for s in seen[:3]) == [1, 2, 2]  # an epoch: 2 + 2 + the tall one alone
    assert [r.getMessage() for r in caplog.records] == [
        "TriLoRA: the bucket of 8 x 12 latents (width x height, as Load Training Images names buckets) holds 1 "
        "image (image 5); its batches hold 1, not batch_size 2"]


def pictures(folder) -> None:
    """Six captioned pictures in three aspect ratios (square, 2:1 wide, 1:2 tall), no two alike."""
    sizes = [(64, 64), (128, 64), (64, 128), (128, 64), (64, 64), (64, 128)]
    for i, (w, h) in enumerate(sizes):
        image = Image.new("RGB", (w, h), (40 * i, 200 - 30 * i, 90))
        image.paste((255, 255, 255), (4 * i, 4, 4 * i + 16, 20))
        image.save(folder / f"p{i}.png")
        (folder / f"p{i}.txt").write_text(f"picture {i}, {w} by {h}", encoding="utf-8")


def test_our_buckets_and_comfyuis_resolution_bucket_train_the_same(comfy_host, tiny, tmp_path):
    pictures(tmp_path)
    nodes = comfy_host.nodes
    with torch.inference_mode():
        images, captions = run_node(comfy_host, "TriLoRASampleImages", folder=str(tmp_path), size=128, upscale=False)
        latents = [nodes.VAEEncode().encode(tiny.vae, image)[0] for image in images]
        conds = [nodes.CLIPTextEncode().encode(tiny.clip, caption)[0] for caption in captions]
    assert [tuple(lat["samples"].shape[2:]) for lat in latents] == [(8, 8), (8, 16), (16, 8), (8, 16), (8, 8), (16, 8)]
    ours = train_loss(comfy_host, tiny.model, latents, conds, seed=5, steps=4)
    if "ResolutionBucket" in nodes.NODE_CLASS_MAPPINGS:  # ComfyUI 0.33: the real node
        with torch.inference_mode():
            bucketed = run_node(comfy_host, "ResolutionBucket", latents=latents, conditioning=conds)
    else:  # 0.3.75: test_dataset_chain's builder, checked against the real node on 0.33
        bucketed = resolution_bucket(latents, conds)
    assert [lat["samples"].shape[0] for lat in bucketed[0]] == [2, 2, 2]
    theirs = train_loss(comfy_host, tiny.model, *bucketed, seed=5, steps=4)
    assert theirs == ours  # the same batches of the same latents and captions, to the bit


def test_a_resumed_bucketed_run_draws_what_the_uninterrupted_run_drew(comfy_host, tiny):
    # 3 buckets (square, wide, tall) of 2, 2 and 1 images, batch 2: the stream crosses an epoch.
    latents, conds = bucketed_data(tiny)
    latents.append({"samples": torch.randn(1, 4, 12, 8, generator=torch.Generator().manual_seed(9))})
    conds.append(tiny.conditioning(seed=20))
    inputs = {"rank": [2], "training_dtype": ["fp32"], "gradient_checkpointing": [False], "batch_size": [2],
              "seed": [6], "learning_rate": [1e-3]}
    with torch.inference_mode():
        full = run_node(comfy_host, "TrainTriLoRA", model=[tiny.model], latents=latents, positive=conds, steps=[6],
                        checkpoint_every=[3], checkpoint_prefix=["buckets/run"], **inputs)
        checkpoint = next((comfy_host.loras / "buckets").glob("run_*_step000003.safetensors"))
        rest = run_node(comfy_host, "TrainTriLoRA", model=[tiny.model], latents=latents, positive=conds, steps=[3],
                        existing_lora=[f"buckets/{checkpoint.name}"], checkpoint_prefix=["buckets/again"], **inputs)
    assert rest[2]["loss"] == full[2]["loss"][3:]
    for prefix, layer in full[1].layers.items():
        assert torch.equal(layer.s, rest[1].layers[prefix].s) and torch.equal(layer.u, rest[1].layers[prefix].u)
