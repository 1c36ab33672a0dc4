"""What TrainTriLoRA and the block-weights loader do per model family, on each family's tiny
fixture in the real ComfyUI: the timestep sampling flow trainers default to, Flux's guidance,
video latents, SDXL's size conditioning, the attention presets, the block groups and the
base-model metadata. What the model sees is read through ComfyUI's own model function wrapper."""
from __future__ import annotations

import math

import comfy.model_sampling
import pytest
import torch
from safetensors import safe_open
from tiny_models import FAMILIES, tiny_model

from harness.host import pack_module

FLOW = [name for name, family in FAMILIES.items() if family.objective == "flow"]


def run(comfy_host, node_id, **inputs):
    cls = comfy_host.nodes.NODE_CLASS_MAPPINGS[node_id]
    with torch.inference_mode():  # as ComfyUI's executor runs every node
        out = cls.execute(**inputs)
    return tuple(out.result) if hasattr(out, "result") else out


def watched(model):
    """A clone of the MODEL whose every forward is recorded: (sigma, input, model conds) per call."""
    calls = []

    def wrapper(apply_model, args):
        calls.append((args["timestep"].detach().clone(), args["input"].shape, dict(args["c"])))
        return apply_model(args["input"], args["timestep"], **args["c"])

    watched_model = model.clone()
    watched_model.set_model_unet_function_wrapper(wrapper)
    return watched_model, calls


def train(comfy_host, model, latents, positive, **inputs):
    inputs = {"steps": 1, "rank": 2, "learning_rate": 1e-3, "seed": 3, "alpha": 2.0, "batch_size": 1,
              "training_dtype": "fp32", "gradient_checkpointing": False, "validate_every": 0, **inputs}
    # validate_every 0: these tests watch the training forwards alone (evaluations: test_train_monitor)
    return run(comfy_host, "TrainTriLoRA", model=[model], latents=latents, positive=positive,
               **{k: [v] for k, v in inputs.items()})[:4]  # the CLIP output: test_train_text_encoder.py


def saved_metadata(comfy_host, trilora, prefix):
    name = run(comfy_host, "SaveTriLoRA", trilora=trilora, filename_prefix=prefix)[0]
    with safe_open(str(comfy_host.loras / name), "pt") as f:
        return f.metadata()


def expected_sigmas(comfy_host, model, kind: str, seed: int, n: int) -> torch.Tensor:
    core = comfy_host.core
    levels = core.timesteps.sample_noise_levels(kind, n, core.generator(seed, "noise", 0, 0))
    ms = model.get_model_object("model_sampling")
    return torch.tensor([float(ms.percent_to_sigma(1.0 - float(t))) for t in levels])


# --------------------------------------------------------------------------- timestep sampling


@pytest.mark.parametrize("name", FLOW)
def test_flow_models_train_at_logit_normal_levels_through_their_own_shift(comfy_host, name):
    tiny = tiny_model(name)
    model, calls = watched(tiny.model)
    _, trilora, _, _ = train(comfy_host, model, [tiny.latent(batch=4)], tiny.conditioning(), batch_size=4, seed=5)
    got = torch.cat([c[0] for c in calls]).double()
    torch.testing.assert_close(got, expected_sigmas(comfy_host, tiny.model, "logit_normal", 5, 4).double(),
                               rtol=1e-5, atol=1e-6)
    ms = tiny.model.get_model_object("model_sampling")
    shift = math.exp(ms.shift) if isinstance(ms, comfy.model_sampling.ModelSamplingFlux) else ms.shift  # Flux keeps mu
    assert trilora.metadata["ss_timestep_sampling"] == "logit_normal"
    assert float(trilora.metadata["ss_discrete_flow_shift"]) == pytest.approx(shift, rel=1e-5)


def test_flux_shift_is_the_one_kohya_recommends_and_a_model_sampling_node_changes_it(comfy_host):
    tiny = tiny_model("flux-dev")
    _, trilora, _, _ = train(comfy_host, tiny.model, [tiny.latent()], tiny.conditioning())
    assert trilora.metadata["ss_discrete_flow_shift"] == "3.15819"  # exp(1.15): kohya's --discrete_flow_shift 3.1582
    shifted = comfy_host.nodes.NODE_CLASS_MAPPINGS["ModelSamplingFlux"]().patch(tiny.model, 1.5, 0.5, 64, 64)[0]
    model, calls = watched(shifted)
    train(comfy_host, model, [tiny.latent(batch=2)], tiny.conditioning(), batch_size=2, seed=8)
    torch.testing.assert_close(torch.cat([c[0] for c in calls]).double(),
                               expected_sigmas(comfy_host, shifted, "logit_normal", 8, 2).double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("name", "choice", "kind"), [
    ("sdxl", "auto", "uniform"), ("sdxl-vpred", "auto", "uniform"), ("sd3.5", "uniform", "uniform"),
    ("sdxl", "logit_normal", "logit_normal"),
])
def test_eps_and_v_models_train_uniformly_and_every_choice_is_honoured(comfy_host, name, choice, kind):
    tiny = tiny_model(name)
    model, calls = watched(tiny.model)
    _, trilora, _, _ = train(comfy_host, model, [tiny.latent(batch=3)], tiny.conditioning(), batch_size=3, seed=2,
                             timestep_sampling=choice)
    torch.testing.assert_close(torch.cat([c[0] for c in calls]).double(),
                               expected_sigmas(comfy_host, tiny.model, kind, 2, 3).double(), rtol=1e-5, atol=1e-6)
    assert trilora.metadata["ss_timestep_sampling"] == kind
    assert ("ss_discrete_flow_shift" in trilora.metadata) == (name == "sd3.5")


# --------------------------------------------------------------------------- guidance


@pytest.mark.parametrize(("guidance", "caption_guidance", "seen"), [(None, None, 1.0), (2.5, None, 2.5), (2.5, 4.0, 4.0)])
def test_flux_dev_trains_with_guidance_one_unless_asked_or_set_by_a_flux_guidance_node(
        comfy_host, guidance, caption_guidance, seen):
    tiny = tiny_model("flux-dev")
    positive = tiny.conditioning()
    if caption_guidance is not None:
        positive = comfy_host.nodes.NODE_CLASS_MAPPINGS["FluxGuidance"]().append(positive, caption_guidance)[0]
    model, calls = watched(tiny.model)
    extra = {} if guidance is None else {"guidance": guidance}
    _, trilora, _, _ = train(comfy_host, model, [tiny.latent()], positive, **extra)
    assert [float(c[2]["guidance"]) for c in calls] == [seen]
    assert trilora.metadata["ss_guidance_scale"] == f"{guidance or 1.0:g}"


def test_flux_trains_without_gradient_checkpointing_by_turning_it_on(comfy_host, caplog):
    # ComfyUI's Flux blocks add residuals in place, which a backward pass through stored activations refuses.
    tiny = tiny_model("flux-dev")
    _, _, loss, _ = train(comfy_host, tiny.model, [tiny.latent(batch=2)], tiny.conditioning(), steps=2, batch_size=2,
                          gradient_checkpointing=False)
    assert all(math.isfinite(v) for v in loss["loss"])
    assert "Flux blocks add in place, which only trains with gradient checkpointing: turning it on" in caplog.text


def test_models_without_a_guidance_input_get_none(comfy_host):
    tiny = tiny_model("sd3.5")
    model, calls = watched(tiny.model)
    _, trilora, _, _ = train(comfy_host, model, [tiny.latent()], tiny.conditioning(), guidance=7.0)
    assert "guidance" not in calls[0][2] and "ss_guidance_scale" not in trilora.metadata


# --------------------------------------------------------------------------- latents and model conds


def test_sdxl_gets_each_latents_own_size_and_the_captions_pooled_output(comfy_host):
    tiny = tiny_model("sdxl")
    positive = tiny.conditioning(seed=4)
    pooled = positive[0][1]["pooled_output"]
    small, wide = tiny.latent(seed=1), {"samples": torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(2))}
    model, calls = watched(tiny.model)
    train(comfy_host, model, [small, wide], positive, steps=2, batch_size=2)
    seen = {tuple(shape[-2:]): c["y"] for _, shape, c in calls}
    assert seen.keys() == {(8, 8), (8, 12)}
    base = tiny.model.model
    for (h, w), y in seen.items():
        want = base.encode_adm(pooled_output=pooled, width=w * 8, height=h * 8)
        torch.testing.assert_close(y.float(), want.float())
        torch.testing.assert_close(y[:, :1280].float(), pooled.float())


@pytest.mark.parametrize("name", ["wan2.1", "wan2.2-5b"])
def test_video_latents_of_any_frame_count_and_images_train_together(comfy_host, name):
    tiny = tiny_model(name)
    c = tiny.latent_shape()[1]
    gen = torch.Generator().manual_seed(6)
    latents = [{"samples": torch.randn(2, c, 2, 8, 8, generator=gen)}, {"samples": torch.randn(1, c, 3, 8, 8, generator=gen)},
               {"samples": torch.randn(1, c, 8, 8, generator=gen)}]  # an image: one frame
    model, calls = watched(tiny.model)
    # Each batch draws from one bucket (one latent shape): 3 steps are the epoch of the 3 buckets.
    _, trilora, loss, _ = train(comfy_host, model, latents, tiny.conditioning(), steps=3, batch_size=4)
    shapes = sorted({tuple(shape) for _, shape, _ in calls})
    assert shapes == sorted([(2, c, 2, 8, 8), (1, c, 3, 8, 8), (1, c, 1, 8, 8)])
    assert all(math.isfinite(v) for v in loss["loss"])


@pytest.mark.parametrize(("name", "shape", "message"), [
    ("wan2.1", (1, 4, 2, 8, 8), "latent 1 has shape [4, 2, 8, 8]; this model takes 16-channel latents "
                                "(channels, frames, height, width)"),
    ("flux-dev", (1, 4, 8, 8), "latent 1 has shape [4, 8, 8]; this model takes 16-channel latents (channels, "
                               "height, width)"),
    ("sdxl", (1, 4, 2, 8, 8), "latent 1 has shape [4, 2, 8, 8]; this model takes 4-channel latents"),
])
def test_latents_of_another_model_are_refused_by_name(comfy_host, name, shape, message):
    tiny = tiny_model(name)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        train(comfy_host, tiny.model, [{"samples": torch.randn(shape)}], tiny.conditioning())


# --------------------------------------------------------------------------- presets and metadata


def block_lists(comfy_host, model):
    return pack_module(comfy_host, "nodes.families").depth_layout_of(model).lists


@pytest.mark.parametrize("name", FLOW)
def test_the_attention_preset_adapts_attention_in_every_block(comfy_host, name):
    train_module = pack_module(comfy_host, "nodes.training")
    tiny = tiny_model(name)
    attention = {t.name for t in train_module.find_targets(tiny.model, "attention")}
    feedforward = {t.name for t in train_module.find_targets(tiny.model, "attention+feedforward")}
    linear = {t.name for t in train_module.find_targets(tiny.model, "all linear")}
    assert attention < feedforward < linear
    for list_name, length in block_lists(comfy_host, tiny.model):
        for i in range(length):
            assert any(n.startswith(f"diffusion_model.{list_name}.{i}.") for n in attention), (list_name, i)


def test_a_flux_single_blocks_fused_linears_count_as_attention(comfy_host):
    train_module = pack_module(comfy_host, "nodes.training")
    attention = {t.name for t in train_module.find_targets(tiny_model("flux-dev").model, "attention")}
    assert {"diffusion_model.single_blocks.0.linear1", "diffusion_model.single_blocks.0.linear2",
            "diffusion_model.double_blocks.0.img_attn.qkv", "diffusion_model.double_blocks.0.txt_attn.proj"} <= attention
    assert not any(".img_mlp." in n or ".txt_mlp." in n or "_mod." in n or n.endswith("img_in") for n in attention)


@pytest.mark.parametrize(("name", "version", "arch"), [
    ("sd15", "sd_v1", "stable-diffusion-v1"),
    ("sdxl", "sdxl_base_v1-0", "stable-diffusion-xl-v1-base"),
    ("sdxl-vpred", "sdxl_base_v1-0", "stable-diffusion-xl-v1-base"),
    ("sd3.5", "sd3", "stable-diffusion-3.5-large"),
    ("flux-dev", "flux1", "flux-1-dev"),
    ("wan2.1", "wan21", "wan2.1"),
    ("wan2.2-5b", "wan22", "wan2.2"),
    ("qwen-image", "qwen_image", "Qwen-Image"),
    ("lumina2", "lumina2", "lumina-2"),
    ("z-image", "z_image", "z-image"),
    ("auraflow", "auraflow", "auraflow"),
])
def test_every_family_gets_its_base_model_metadata(comfy_host, name, version, arch):
    families = pack_module(comfy_host, "nodes.families")
    meta = families.base_model_metadata(tiny_model(name).model)
    assert (meta["ss_base_model_version"], meta["modelspec.architecture"]) == (version, f"{arch}/lora")


def test_a_wan_trained_file_says_it_is_wan(comfy_host):
    tiny = tiny_model("wan2.1")
    _, trilora, _, _ = train(comfy_host, tiny.model, [tiny.latent()], tiny.conditioning())
    meta = saved_metadata(comfy_host, trilora, "families/wan")
    assert (meta["ss_base_model_version"], meta["modelspec.architecture"]) == ("wan21", "wan2.1/lora")
    assert meta["ss_timestep_sampling"] == "logit_normal" and meta["ss_discrete_flow_shift"] == "8"


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_fixture_is_a_family_of_the_table_with_its_block_lists(comfy_host, name):
    """The one family table (nodes/families.py) knows every family the suite builds a model of, and
    names the block lists each transformer has (so its block-weight sliders move its own blocks)."""
    families = pack_module(comfy_host, "nodes.families")
    model = tiny_model(name).model
    family = families.family_of(model)
    assert family in families.FAMILIES.values(), f"{name}: no entry in nodes/families.py FAMILIES"
    keys = [n for n, _ in model.model.named_parameters()]
    is_unet = any(k.startswith("diffusion_model.input_blocks.") for k in keys)
    assert bool(family.block_lists) != is_unet, family
    if family.block_lists:
        layout = families.depth_layout_of(model)
        present = {k.split(".")[1] for k in keys if k.startswith("diffusion_model.") and k.split(".")[2:3] != []
                   and k.split(".")[2].isdigit()}
        assert {n for n, _ in layout.lists} | set(layout.early) == present & set(family.block_lists + family.early_blocks)
        assert set(family.block_lists) <= present


# --------------------------------------------------------------------------- block weights


@pytest.mark.parametrize(("name", "described", "groups"), [
    ("flux-dev", "Flux: input_blocks = double_blocks 0, middle_block = single_blocks 0, output_blocks = none",
     {"UNet input blocks", "UNet middle block", "UNet other"}),
    ("sd3.5", "SD3: input_blocks = joint_blocks 0, middle_block = joint_blocks 1, output_blocks = none",
     {"UNet input blocks", "UNet middle block", "UNet other"}),
    ("wan2.1", "Wan 2.1: input_blocks = blocks 0, middle_block = blocks 1, output_blocks = none",
     {"UNet input blocks", "UNet middle block", "UNet other"}),
    ("auraflow", "AuraFlow: input_blocks = double_layers 0, middle_block = single_layers 0, output_blocks = none",
     {"UNet input blocks", "UNet middle block", "UNet other"}),
    # The tiny SDXL (KOALA-700M's layout) has no middle block.
    ("sdxl", "SDXL: UNet input, middle and output blocks", {"UNet input blocks", "UNet output blocks", "UNet other"}),
])
def test_block_weights_move_each_familys_own_blocks(comfy_host, name, described, groups):
    core = comfy_host.core
    train_module = pack_module(comfy_host, "nodes.training")
    blocks = pack_module(comfy_host, "trilora_core.blocks")
    tiny = tiny_model(name)
    g = torch.Generator().manual_seed(1)
    targets = train_module.find_targets(tiny.model, "all linear")
    layers = {t.prefix: core.TriLoRALayer(torch.randn(t.weight_shape[0], 1, generator=g), torch.ones(1),
                                          torch.randn(1, math.prod(t.weight_shape[1:]), generator=g), 1.0)
              for t in targets}
    core.write_trilora(str(comfy_host.loras / f"blocks_{name}.safetensors"), layers)
    multipliers = {"input_blocks": 0.5, "middle_block": 0.0, "output_blocks": -1.0}
    model, _, info = run(comfy_host, "TriLoRALoaderBlockWeights", model=tiny.model, clip=None,
                         trilora_name=f"blocks_{name}.safetensors", strength_model=0.8, strength_clip=0.0,
                         text_encoder=1.0, **multipliers)
    assert f"; {described}; block weights:" in info
    layout = pack_module(comfy_host, "nodes.families").depth_layout_of(tiny.model)
    by_group = {"UNet input blocks": 0.5, "UNet middle block": 0.0, "UNet output blocks": -1.0}
    seen = set()
    for t in targets:
        key = f"{t.name}.weight"
        group = blocks.block_group(key, layout)
        seen.add(group)
        strength = 0.8 * by_group.get(group, 1.0)
        if strength == 0:
            assert key not in model.patches, key
        else:
            assert [p[0] for p in model.patches[key]] == [pytest.approx(strength)], key
    assert seen == groups


@pytest.mark.parametrize("input_requires_grad", [False, True])
def test_checkpointed_blocks_that_add_into_their_input_in_place_get_the_forwards_gradients(comfy_host,
                                                                                          input_requires_grad):
    # ComfyUI's Flux blocks add their residual into their input (img += ...). Recomputed from the
    # modified input, a checkpointed block's activations (and gradients) would differ from the
    # forward's: silently wrong when the input requires grad, an error when it does not (a Flux
    # model trained with target_layers "attention", whose first block's input needs no grad).
    targets = pack_module(comfy_host, "nodes.training.targets")

    class Block(torch.nn.Module):
        def __init__(self, in_place: bool):
            super().__init__()
            self.norm, self.proj, self.in_place = torch.nn.LayerNorm(8), torch.nn.Linear(8, 8), in_place

        def forward(self, x):
            y = self.proj(self.norm(x) * x)
            if self.in_place:
                x += y
                return x
            return x + y

    def grads(in_place: bool, checkpointed: bool):
        torch.manual_seed(0)
        block = Block(in_place)
        if checkpointed:
            targets._checkpoint(block)
        x0 = torch.randn(2, 4, 8, requires_grad=input_requires_grad)
        x = x0 * 1.0 if input_requires_grad else x0.clone()  # a non-leaf, as a block's input is
        (block(x) ** 2).sum().backward()
        return [p.grad.clone() for p in block.parameters()] + ([x0.grad.clone()] if input_requires_grad else [])

    expected = grads(in_place=False, checkpointed=False)
    for got, want in zip(grads(in_place=True, checkpointed=True), expected, strict=True):
        torch.testing.assert_close(got, want)
