"""Every model family through the pack's nodes in the real ComfyUI, on each family's tiny model
(tests/comfy/tiny_models.py): one table of cases (CASES), one test body per thing a user does
(PEFT's test_custom_models shape).

- TriLoRALoaderModelOnly patches W + strength * delta, by hand, and as ComfyUI's LoraLoader does
  with the same file;
- TriLoRAConvertLoRA turns a LoRA in the family's usual naming into an exact TriLoRA;
- TrainTriLoRA trains with the family's own objective (eps, v or flow), every adapted layer runs,
  and the loss on fixed noise falls; SaveTriLoRA names the base model as kohya-style tools read it;
- TriLoRAExportLoRA writes kohya naming that ComfyUI loads to the same weights, and converts back;
- TrainTriLoRA resumes from the saved file.

The training cases are marked slow (one short run per family, shared by the tests after it)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import comfy.lora
import comfy.model_management as mm
import comfy.samplers
import comfy.utils
import pytest
import torch
from comfy_extras.nodes_custom_sampler import Guider_Basic
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_models import FAMILIES, tiny_model


@dataclass(frozen=True)
class Case:
    """family: a tiny_models family. layers: diffusion-model modules a hand-made TriLoRA file
    adapts (named as kohya does, lora_unet_ + the module path). usual: layer names of a LoRA in
    the naming this family's LoRAs usually have (kohya lora_up/lora_down for lora_unet_ names,
    diffusers/PEFT lora_A/lora_B otherwise; some address a slice of a fused qkv weight).
    base_model: (ss_base_model_version, modelspec.architecture without /lora) of a trained file.
    unused: modules that run but whose output the model discards, so they get no gradient
    (the last block's text stream of a dual-stream model without single-stream blocks)."""
    family: str
    layers: tuple[str, ...]
    usual: tuple[str, ...]
    base_model: tuple[str, str]
    unused: tuple[str, ...] = ()


CASES = [
    Case("sd15", ("input_blocks.1.1.transformer_blocks.0.attn2.to_k", "input_blocks.1.0.in_layers.2",
                  "middle_block.1.proj_out"),
         ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", "lora_unet_down_blocks_0_resnets_0_conv1",
          "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2"),
         ("sd_v1", "stable-diffusion-v1")),
    *(Case(name, ("input_blocks.2.1.transformer_blocks.0.attn2.to_k", "input_blocks.1.0.in_layers.2", "label_emb.0.0"),
               ("lora_unet_input_blocks_2_1_transformer_blocks_1_attn1_to_q", "lora_unet_input_blocks_3_1_proj_out",
                "lora_unet_input_blocks_1_0_out_layers_3"),
               ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base"))
      for name in ("sdxl", "sdxl-vpred")),
    Case("sd3.5", ("joint_blocks.0.x_block.attn.qkv", "joint_blocks.0.context_block.mlp.fc2", "x_embedder.proj"),
         ("transformer.transformer_blocks.0.attn.to_q", "transformer.transformer_blocks.0.attn.add_k_proj",
          "transformer.transformer_blocks.0.ff.net.0.proj"),
         ("sd3", "stable-diffusion-3.5-large")),
    Case("flux-dev", ("double_blocks.0.img_attn.qkv", "single_blocks.0.linear1", "txt_in"),
         ("transformer.transformer_blocks.0.attn.to_q", "transformer.single_transformer_blocks.0.proj_mlp",
          "transformer.transformer_blocks.0.ff_context.net.2"),
         ("flux1", "flux-1-dev")),
    *(Case(name, ("blocks.0.self_attn.q", "blocks.1.ffn.0", "patch_embedding"),
               ("diffusion_model.blocks.0.cross_attn.k", "diffusion_model.blocks.1.ffn.2"),
               base_model)
      for name, base_model in (("wan2.1", ("wan21", "wan2.1")), ("wan2.2-5b", ("wan22", "wan2.2")))),
    Case("qwen-image", ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.img_mlp.net.2", "img_in"),
         ("transformer.transformer_blocks.0.attn.add_k_proj", "transformer.transformer_blocks.0.txt_mlp.net.0.proj"),
         ("qwen_image", "Qwen-Image"),
         unused=("transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.attn.to_add_out",
                 "transformer_blocks.0.txt_mlp.net.0.proj", "transformer_blocks.0.txt_mlp.net.2")),
    *(Case(name, ("layers.0.attention.qkv", "context_refiner.0.feed_forward.w2", "x_embedder"),
               ("diffusion_model.layers.0.attention.to_k", "diffusion_model.noise_refiner.1.feed_forward.w3"),
               base_model)
      for name, base_model in (("lumina2", ("lumina2", "lumina-2")), ("z-image", ("z_image", "z-image")))),
    Case("auraflow", ("double_layers.0.attn.w2q", "single_layers.0.mlp.c_fc1", "cond_seq_linear"),
         ("transformer.joint_transformer_blocks.0.attn.to_q", "transformer.joint_transformer_blocks.0.ff_context.linear_1",
          "transformer.single_transformer_blocks.0.attn.to_out.0"),
         ("auraflow", "auraflow")),
]
assert sorted(c.family for c in CASES) == sorted(FAMILIES), "every fixture family has a case"

TRAIN_STEPS, TRAIN_LR = 20, 5e-3  # the tiny random models learn little per step


def params(slow: bool = False) -> list:
    marks = [pytest.mark.slow] if slow else []
    return [pytest.param(case, id=case.family, marks=marks) for case in CASES]


# --------------------------------------------------------------------------- helpers


def run(comfy_host, node_id, **inputs):
    """One node as ComfyUI's executor runs it (class-level execute, under inference mode)."""
    cls = comfy_host.nodes.NODE_CLASS_MAPPINGS[node_id]
    with torch.inference_mode():
        out = cls.execute(**inputs)
    return tuple(out.result) if hasattr(out, "result") else out


@pytest.fixture(autouse=True)
def unloaded():
    """Tests read unpatched weights off the shared models: nothing stays loaded with patches."""
    mm.unload_all_models()
    yield
    mm.unload_all_models()


def weight_key(module: str) -> str:
    return f"diffusion_model.{module}.weight"


def kohya(module: str) -> str:
    return "lora_unet_" + module.replace(".", "_")


def patched(model, keys) -> dict[str, torch.Tensor]:
    """The weights ComfyUI computes for these keys when it loads the model for sampling."""
    mm.load_models_gpu([model])
    out = {k: comfy.utils.get_attr(model.model, k).detach().float().clone() for k in keys}
    mm.unload_all_models()
    return out


def base_weights(tiny, keys) -> dict[str, torch.Tensor]:
    return {k: comfy.utils.get_attr(tiny.model.model, k).detach().float().clone() for k in keys}


def assert_close(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")


def lora_target(tiny, name: str):
    """(weight key, slice or None) ComfyUI's key map gives a LoRA layer name of this model."""
    target = comfy.lora.model_lora_keys_unet(tiny.model.model, {})[name]
    return target if isinstance(target, tuple) else (target, None)


def write_usual_lora(path, tiny, names, seed=0) -> None:
    """Random rank-3 LoRA factors for these layer names, kohya (lora_up/lora_down/alpha) or
    PEFT (lora_A/lora_B, alpha = rank) style as the name's family writes them."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in names:
        key, part = lora_target(tiny, name)
        shape = list(comfy.utils.get_attr(tiny.model.model, key).shape)
        if part is not None:
            shape[part[0]] = part[2]
        up = torch.randn(shape[0], 3, *([1] * (len(shape) - 2)), generator=g) * 0.1
        down = torch.randn(3, *shape[1:], generator=g) * 0.1
        if name.startswith("lora_unet_"):
            tensors.update({f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down,
                            f"{name}.alpha": torch.tensor(1.5)})
        else:
            tensors.update({f"{name}.lora_B.weight": up.flatten(1), f"{name}.lora_A.weight": down})
    save_file(tensors, str(path))


def metadata(path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


# --------------------------------------------------------------------------- loading


@pytest.mark.parametrize("case", params())
def test_loader_patches_w_plus_strength_delta_like_lora_loader(comfy_host, case):
    core, tiny = comfy_host.core, tiny_model(case.family)
    keys = [weight_key(m) for m in case.layers]
    base = base_weights(tiny, keys)
    g = torch.Generator().manual_seed(1)
    layers = {}
    for module, key in zip(case.layers, keys, strict=True):
        shape = base[key].shape
        layers[kohya(module)] = core.TriLoRALayer(torch.randn(shape[0], 3, generator=g) * 0.1,
                                                  torch.rand(3, generator=g) + 0.5,
                                                  torch.randn(3, *shape[1:], generator=g) * 0.1, 1.5)
    name = f"matrix/{case.family}/random.safetensors"
    (comfy_host.loras / name).parent.mkdir(parents=True, exist_ok=True)
    core.write_trilora(str(comfy_host.loras / name), layers)
    written = core.read_trilora(str(comfy_host.loras / name)).layers

    strength = -0.7
    model, info = run(comfy_host, "TriLoRALoaderModelOnly", model=tiny.model, trilora_name=name,
                      strength_model=strength)
    ours = patched(model, keys)
    by_hand = {key: base[key] + strength * written[kohya(m)].delta() for m, key in zip(case.layers, keys, strict=True)}
    assert_close(ours, by_hand)
    stock = patched(comfy_host.nodes.LoraLoaderModelOnly().load_lora_model_only(tiny.model, name, strength)[0], keys)
    assert_close(ours, stock)
    assert f"{len(keys)} of {len(keys)} layers matched" in info


@pytest.mark.parametrize("case", params())
def test_convert_of_a_lora_in_the_family_naming_is_exact(comfy_host, case):
    tiny = tiny_model(case.family)
    name = f"matrix/{case.family}/usual_lora.safetensors"
    (comfy_host.loras / name).parent.mkdir(parents=True, exist_ok=True)
    write_usual_lora(comfy_host.loras / name, tiny, case.usual)
    keys = sorted({lora_target(tiny, n)[0] for n in case.usual})
    stock = patched(comfy_host.nodes.LoraLoaderModelOnly().load_lora_model_only(tiny.model, name, 1.0)[0], keys)
    assert all(not torch.equal(stock[k], w) for k, w in base_weights(tiny, keys).items())

    _, converted, info = run(comfy_host, "TriLoRAConvertLoRA", lora_name=name,
                             filename_prefix=f"matrix/{case.family}/converted", save_dtype="fp32", model=tiny.model)
    model, _ = run(comfy_host, "TriLoRALoaderModelOnly", model=tiny.model, trilora_name=converted, strength_model=1.0)
    assert_close(patched(model, keys), stock)
    assert "not in the connected model" not in info


# --------------------------------------------------------------------------- training

_trained: dict[str, tuple] = {}


def adaptable(tiny) -> dict[str, torch.nn.Module]:
    """The diffusion model's Linear and conv modules, by name."""
    return {n: m for n, m in tiny.model.model.diffusion_model.named_modules()
            if isinstance(m, torch.nn.Linear | torch.nn.Conv2d | torch.nn.Conv3d)}


def train(comfy_host, tiny, model, **inputs):
    """TrainTriLoRA on one latent of the family and one caption (the executor's list inputs), fp32."""
    inputs = dict(dict(rank=4, learning_rate=TRAIN_LR, seed=0, alpha=4.0, batch_size=1, training_dtype="fp32",
                       gradient_checkpointing=True, target_layers="all linear+conv", s_learning_rate_scale=1.0,
                       loss_weighting="none",  # the family's own objective, unweighted
                       validate_every=0),  # no measuring forwards beside training's (one test asks for them)
                  **inputs)
    links = {k: inputs.pop(k) for k in ("validation_latents", "validation_positive") if k in inputs}
    return run(comfy_host, "TrainTriLoRA", model=[model], latents=[tiny.latent(seed=3)],
               positive=[tiny.conditioning()], **links, **{k: [v] for k, v in inputs.items()})[:4]


def trained(comfy_host, case):
    """(trilora, loss_map, saved file name, recorded first forward, modules that ran) of one short
    run per family, with the default gradient checkpointing."""
    if case.family not in _trained:
        tiny = tiny_model(case.family)
        calls, ran = [], set()
        hooks = [m.register_forward_hook(lambda *_, n=n: ran.add(n)) for n, m in adaptable(tiny).items()]

        def record(apply_model, args):
            out = apply_model(args["input"], args["timestep"], **args["c"])
            calls.append((args["input"].detach().clone(), args["timestep"].detach().clone(), out.detach().clone()))
            return out

        model = tiny.model.clone()
        model.set_model_unet_function_wrapper(record)
        _, trilora, loss_map, steps = train(comfy_host, tiny, model, steps=TRAIN_STEPS)
        for hook in hooks:
            hook.remove()
        assert steps == TRAIN_STEPS
        saved = run(comfy_host, "SaveTriLoRA", trilora=trilora, filename_prefix=f"matrix/{case.family}/trained")[0]
        _trained[case.family] = (trilora, loss_map, saved, calls[0], ran)
    return _trained[case.family]


def objective_error(objective: str, x0, xt, sigma, denoised) -> torch.Tensor:
    """Squared error of the network's own prediction against the textbook target of its objective,
    recovered from one forward (noisy input xt at sigma, ComfyUI's denoised output)."""
    s = sigma.reshape(-1, *[1] * (xt.ndim - 1))
    if objective == "eps":  # xt = x0 + s n, prediction n
        noise, pred = (xt - x0) / s, (xt - denoised) / s
        return pred - noise
    if objective == "v":  # VP form: alpha = 1/sqrt(1+s^2), v = alpha n - s alpha x0
        alpha = 1 / torch.sqrt(1 + s * s)
        noise = (xt - x0) / s
        pred = (xt * alpha * alpha - denoised) / (s * alpha)
        return pred - (alpha * noise - s * alpha * x0)
    assert objective == "flow"  # xt = (1 - s) x0 + s n, prediction n - x0
    noise = (xt - (1 - s) * x0) / s
    return (xt - denoised) / s - (noise - x0)


def auto_weight(objective: str, s: float) -> float:
    """The weight of loss_weighting auto (the default) at sigma s: the denoised image's error (x0) on eps
    and v models, the objective's own on flow models; x0 error = the own error times
    d(denoised)/d(output): -s (eps), -s alpha (v)."""
    return {"eps": s * s, "v": s * s / (1 + s * s), "flow": 1.0}[objective]


class _FixedNoiseLoss(comfy.samplers.Sampler):
    """Mean squared error in the model's own objective at fixed noise levels, instead of sampling."""

    def __init__(self, objective, out):
        self.objective, self.out = objective, out

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        ms = model_wrap.inner_model.model_sampling
        for percent in (0.2, 0.4, 0.6, 0.8):
            sigma = torch.tensor([float(ms.percent_to_sigma(percent))])
            xt = ms.noise_scaling(sigma, noise.clone(), latent_image, False)
            denoised = model_wrap(xt, sigma, **extra_args)
            self.out.append(objective_error(self.objective, latent_image, xt, sigma, denoised).square().mean().item())
        return torch.zeros_like(latent_image)


def fixed_noise_loss(model, tiny) -> float:
    out = []
    latent = model.model.process_latent_in(tiny.latent(seed=3)["samples"])
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        guider = Guider_Basic(model)
        guider.set_conds(tiny.conditioning())
        guider.sample(noise, latent, _FixedNoiseLoss(tiny.objective, out), torch.tensor([1.0, 0.0]), seed=0)
    return sum(out) / len(out)


@pytest.mark.parametrize("case", params(slow=True))
def test_training_uses_the_family_objective_and_every_layer(comfy_host, case):
    tiny = tiny_model(case.family)
    trilora, loss_map, _, (xt, sigma, denoised), ran = trained(comfy_host, case)
    # The first step runs the untrained model (s = 0) on one image: its loss is the textbook
    # error of this family's objective, recovered from that very forward.
    x0 = tiny.model.model.process_latent_in(tiny.latent(seed=3)["samples"])
    want = objective_error(tiny.objective, x0, xt, sigma, denoised).square().mean().item()
    assert loss_map["loss"][0] == pytest.approx(want, rel=1e-4)
    assert len(loss_map["loss"]) == TRAIN_STEPS and all(math.isfinite(v) for v in loss_map["loss"])
    # Every Linear and conv layer of the diffusion model is adapted and runs in the forward, and
    # the gradient reaches each one whose output the model uses: its s left 0.
    modules = adaptable(tiny)
    assert len(trilora.layers) == len(modules) and ran == modules.keys()
    idle = sorted(p for p, layer in trilora.layers.items() if not bool(layer.s.abs().max() > 0))
    assert idle == sorted(kohya(m) for m in case.unused)


@pytest.mark.parametrize("case", params(slow=True))
def test_loss_weighting_auto_weighs_the_objective_as_the_family_needs(comfy_host, case):
    # One step at the default loss_weighting (auto) sees the same first forward as the unweighted run:
    # its loss is that run's first loss times auto's weight at that sigma (x0 on eps/v, 1 on flow).
    tiny = tiny_model(case.family)
    _, loss_map, _, (_, sigma, _), _ = trained(comfy_host, case)
    auto = train(comfy_host, tiny, tiny.model, steps=1, loss_weighting="auto")[2]
    want = loss_map["loss"][0] * auto_weight(tiny.objective, float(sigma.flatten()[0]))
    assert auto["loss"][0] == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("case", params(slow=True))
def test_training_lowers_the_loss_on_fixed_noise(comfy_host, case):
    tiny = tiny_model(case.family)
    saved = trained(comfy_host, case)[2]
    before = fixed_noise_loss(tiny.model, tiny)
    model, _ = run(comfy_host, "TriLoRALoaderModelOnly", model=tiny.model, trilora_name=saved, strength_model=1.0)
    after = fixed_noise_loss(model, tiny)
    assert after < 0.9 * before, (before, after)


@pytest.mark.parametrize("case", params(slow=True))
def test_saved_file_names_the_base_model(comfy_host, case):
    meta = metadata(comfy_host.loras / trained(comfy_host, case)[2])
    version, architecture = case.base_model
    assert (meta.get("ss_base_model_version"), meta.get("modelspec.architecture")) == (version, f"{architecture}/lora")


@pytest.mark.parametrize("case", params(slow=True))
def test_export_to_kohya_and_back_is_exact(comfy_host, case):
    core, tiny = comfy_host.core, tiny_model(case.family)
    saved = trained(comfy_host, case)[2]
    exported = run(comfy_host, "TriLoRAExportLoRA", trilora_name=saved,
                   filename_prefix=f"matrix/{case.family}/kohya", save_dtype="fp32", model=tiny.model)[0]
    with safe_open(str(comfy_host.loras / exported), "pt") as f:
        names = set(f.keys())
    assert all(k.startswith("lora_unet_") and k.endswith((".lora_up.weight", ".lora_down.weight", ".alpha"))
               for k in names), sorted(names)[:5]
    assert metadata(comfy_host.loras / exported)["ss_network_module"] == "networks.lora"

    keys = [weight_key(n) for n in adaptable(tiny)]
    ours = patched(run(comfy_host, "TriLoRALoaderModelOnly", model=tiny.model, trilora_name=saved,
                       strength_model=1.0)[0], keys)
    stock = patched(comfy_host.nodes.LoraLoaderModelOnly().load_lora_model_only(tiny.model, exported, 1.0)[0], keys)
    assert_close(stock, ours)

    back = run(comfy_host, "TriLoRAConvertLoRA", lora_name=exported, filename_prefix=f"matrix/{case.family}/back",
               save_dtype="fp32", model=tiny.model)[1]
    first, again = (core.read_trilora(str(comfy_host.loras / n)).layers for n in (saved, back))
    assert first.keys() == again.keys()
    for prefix, layer in first.items():
        torch.testing.assert_close(again[prefix].delta(), layer.delta(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("case", params(slow=True))
def test_training_resumes_from_the_saved_file(comfy_host, case):
    core, tiny = comfy_host.core, tiny_model(case.family)
    saved = trained(comfy_host, case)[2]
    _, resumed, resumed_loss, steps = train(comfy_host, tiny, tiny.model, steps=2, existing_lora=saved)
    assert steps == TRAIN_STEPS + 2 and resumed.metadata["trilora_steps"] == str(TRAIN_STEPS + 2)
    assert resumed.layers.keys() == core.read_trilora(str(comfy_host.loras / saved)).layers.keys()
    assert json.loads(resumed.metadata["trilora_training_args"])["resumed_from_step"] == TRAIN_STEPS
    assert len(resumed_loss["loss"]) == 2 and all(math.isfinite(v) for v in resumed_loss["loss"])


@pytest.mark.parametrize("case", params(slow=True))
def test_training_without_gradient_checkpointing_runs(comfy_host, case):
    tiny = tiny_model(case.family)
    _, trilora, loss_map, steps = train(comfy_host, tiny, tiny.model, steps=1, gradient_checkpointing=False)
    assert steps == 1 and math.isfinite(loss_map["loss"][0]) and trilora.layers


@pytest.mark.parametrize("case", params())
def test_training_at_the_nodes_defaults_adapts_the_attention_layers(comfy_host, case):
    # Train TriLoRA as a user drops it in: target_layers "attention" and the default step sizes
    # (only fp32 for the CPU). The attention layers of each family are found, run and learn.
    tiny = tiny_model(case.family)
    _, trilora, loss_map, _, _ = run(comfy_host, "TrainTriLoRA", model=[tiny.model], latents=[tiny.latent(seed=3)],
                                     positive=[tiny.conditioning()], steps=[2], training_dtype=["fp32"])
    assert len(loss_map["loss"]) == 2 and all(math.isfinite(v) for v in loss_map["loss"])
    every = {kohya(name) for name in adaptable(tiny)}
    assert trilora.layers and set(trilora.layers) < every  # a proper subset: attention only
    assert all("attn" in p or "attention" in p or p.endswith(("linear1", "linear2")) for p in trilora.layers), \
        sorted(trilora.layers)
    idle = {p for p, layer in trilora.layers.items() if not bool(layer.s.abs().max() > 0)}
    assert idle <= {kohya(m) for m in case.unused}, sorted(idle)


@pytest.mark.parametrize("case", params())
def test_held_out_error_drift_keep_best_and_previews_in_every_family(comfy_host, case):
    # Validation latents of the family, the drift on the zeroed caption, keep_best and a live
    # preview (the family's own schedule and Latent2RGB factors) after every step.
    tiny = tiny_model(case.family)
    previews = []
    comfy.utils.set_progress_bar_global_hook(lambda v, t, preview, node_id=None: previews.append(preview)
                                             if preview is not None else None)
    try:
        _, trilora, loss_map, steps = train(
            comfy_host, tiny, tiny.model, steps=2, gradient_checkpointing=False, validate_every=1,
            keep_best="held-out", preview_every=1, validation_latents=[tiny.latent(seed=4)],
            validation_positive=[tiny.conditioning(seed=1)])
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert loss_map["eval_steps"] == [0, 1, 2] and len(loss_map["loss"]) == 2
    assert all(math.isfinite(v) and v > 0 for v in loss_map["heldout"] + loss_map["heldout_x0"])
    assert loss_map["drift"][0] == 0.0 and all(math.isfinite(v) for v in loss_map["drift"])
    best = loss_map["heldout"].index(min(loss_map["heldout"]))
    assert loss_map["best_step"] == steps == best and trilora.metadata["trilora_steps"] == str(best)
    has_factors = tiny.model.model.latent_format.latent_rgb_factors is not None
    assert len(previews) == (2 if has_factors else 0)
    assert all(p[0] == "JPEG" and min(p[1].size) >= 1 for p in previews)
