"""Export TriLoRA as LoRA in diffusers/PEFT and ComfyUI names, checked by the libraries that read
them: a diffusers StableDiffusionPipeline built from the tiny SD1.5 checkpoint's own weights
(UNet2DConditionModel and transformers' CLIPTextModel, through ComfyUI's diffusers <-> ldm key map
comfy.utils.unet_to_diffusers) loads the exported file with load_lora_weights (PEFT underneath) and
fuses it; every weight must equal the one ComfyUI patches from the same file at the same strength,
and the one it patches from the TriLoRA itself. The same for the tiny Flux in diffusers'
FluxTransformer2DModel (FluxPipeline's own loader), whose fused weights diffusers splits."""
from __future__ import annotations

import comfy.lora
import comfy.model_management as mm
import comfy.utils
import pytest
import torch
from conftest import COMFY, run_node
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

NONE = "[None]"
STRENGTH = 0.8
CLIP_PREFIX = "clip_l.transformer."
TEXT_MODEL = CLIP_PREFIX + "text_model."  # transformers 5's CLIPTextModel holds its text model's modules itself


@pytest.fixture(scope="module")
def adapted(comfy_host, tiny):
    """{weight key: layer}: a TriLoRA on every linear and conv weight of the tiny UNet and of
    CLIP-L's first two layers (random factors, rank 3, alpha 2), saved under the pack's names."""
    core = comfy_host.core
    key_map = {}
    comfy.lora.model_lora_keys_unet(tiny.model.model, key_map)
    comfy.lora.model_lora_keys_clip(tiny.clip.cond_stage_model, key_map)
    names = core.prefixes_by_weight(key_map)
    weights = {**tiny.model.model.state_dict(), **tiny.clip.cond_stage_model.state_dict()}
    g = torch.Generator().manual_seed(27)
    layers, by_weight = {}, {}
    for key, w in sorted(weights.items()):
        clip_layer = key.startswith(CLIP_PREFIX + "text_model.encoder.layers.") and key.split(".")[5] in ("0", "1")
        if w.ndim < 2 or key not in names or not (key.startswith("diffusion_model.") or clip_layer):
            continue
        u = torch.randn(w.shape[0], 3, generator=g) * 0.05
        vt = torch.randn(3, *w.shape[1:], generator=g) * 0.05
        layers[names[key]] = by_weight[key] = core.TriLoRALayer(u, torch.rand(3, generator=g) + 0.5, vt, 2.0)
    core.write_trilora(comfy_host.loras / "diffusers_src.safetensors", layers, {})
    return by_weight


def tolerance(key: str) -> dict:
    """Float rounding; CLIP's: one unit in fp16's last place (ComfyUI patches it in fp16 on the CPU)."""
    return dict(rtol=1e-3, atol=1e-4) if key.startswith(CLIP_PREFIX) else dict(rtol=1e-5, atol=1e-6)


def comfy_patched(comfy_host, tiny, name: str, loader: str = "LoraLoader") -> dict[str, torch.Tensor]:
    """Every weight of the UNet and CLIP-L as ComfyUI patches them from ``name``: its stock Load
    LoRA, or the pack's Load TriLoRA (``loader="TriLoRALoader"``)."""
    if loader == "LoraLoader":
        model, clip = comfy_host.nodes.LoraLoader().load_lora(tiny.model, tiny.clip, name, STRENGTH, STRENGTH)
    else:
        model, clip, _ = run_node(comfy_host, loader, model=tiny.model, clip=tiny.clip, trilora_name=name,
                                  strength_model=STRENGTH, strength_clip=STRENGTH)
    mm.load_models_gpu([model, clip.patcher])
    out = {k: v.detach().clone() for k, v in model.model.state_dict().items()}
    out.update((k, v.detach().clone()) for k, v in clip.cond_stage_model.state_dict().items())
    mm.unload_all_models()
    return out


def diffusers_pipeline(tiny):
    """A StableDiffusionPipeline with the tiny checkpoint's UNet and CLIP-L weights (fp32)."""
    config = tiny.model.model.model_config.unet_config
    assert (config["channel_mult"], config["num_res_blocks"], config["context_dim"]) == ([1], [1], 768)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, block_out_channels=(320,), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
        cross_attention_dim=768, attention_head_dim=config["num_heads"], use_linear_projection=False)
    ldm = tiny.model.model.state_dict()
    unet_sd = {d: ldm["diffusion_model." + k].float() for d, k in comfy.utils.unet_to_diffusers(config).items()
               if "diffusion_model." + k in ldm}  # the map also names shortcuts this one-level UNet lacks
    assert set(unet_sd) == set(unet.state_dict())  # every diffusers weight has its ComfyUI counterpart
    unet.load_state_dict(unet_sd, strict=True)

    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768))
    clip_sd = {k[len(TEXT_MODEL):]: v.float() for k, v in tiny.clip.cond_stage_model.state_dict().items()
               if k.startswith(TEXT_MODEL)}
    missing, unexpected = text_encoder.load_state_dict(clip_sd, strict=False)
    assert not unexpected and all(".weight" not in k for k in missing), (missing, unexpected)

    tokenizer = CLIPTokenizer.from_pretrained(str(COMFY / "comfy" / "sd1_tokenizer"))
    vae = AutoencoderKL(block_out_channels=(32,), norm_num_groups=8, latent_channels=4)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(steps_offset=1), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def fused_weights(pipe, unet_config: dict) -> dict[str, torch.Tensor]:
    """{ComfyUI weight key: weight} of the pipeline's UNet and text encoder."""
    to_ldm = comfy.utils.unet_to_diffusers(unet_config)
    unet = {k.replace(".base_layer", ""): v for k, v in pipe.unet.state_dict().items() if "lora_" not in k}
    out = {"diffusion_model." + to_ldm[k]: v for k, v in unet.items() if k in to_ldm}
    out.update((TEXT_MODEL + k.replace(".base_layer", ""), v) for k, v in pipe.text_encoder.state_dict().items()
               if "lora_" not in k)
    return out


def export(comfy_host, fmt: str, prefix: str, model=None, clip=None, source: str = "diffusers_src.safetensors"):
    """(file name, info) of Export TriLoRA as LoRA in ``fmt``, fp32."""
    return run_node(comfy_host, "TriLoRAExportLoRA", trilora_name=source, filename_prefix=prefix, save_dtype="fp32",
                    model=model, clip=clip, format=fmt)


def test_diffusers_load_lora_weights_gives_comfyuis_weights(comfy_host, tiny, adapted):
    name, info = export(comfy_host, "diffusers / PEFT", "diffusers/peft", tiny.model, tiny.clip)
    assert info.startswith("exported diffusers_src.safetensors as a diffusers / PEFT LoRA: ")
    with safe_open(str(comfy_host.loras / name), framework="pt") as f:
        keys = sorted(f.keys())
    assert keys and all(k.startswith(("unet.", "text_encoder.")) and k.endswith((".lora_A.weight", ".lora_B.weight"))
                        for k in keys)
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_A.weight" in keys
    assert "text_encoder.text_model.encoder.layers.1.self_attn.q_proj.lora_B.weight" in keys
    assert len(keys) == 2 * len(adapted)

    pipe = diffusers_pipeline(tiny)
    pipe.load_lora_weights(str(comfy_host.loras / name), adapter_name="trilora")
    peft_layers = [m for m in [*pipe.unet.modules(), *pipe.text_encoder.modules()] if hasattr(m, "lora_A")]
    assert len(peft_layers) == len(adapted)  # PEFT wrapped every exported layer
    pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=STRENGTH)
    got = fused_weights(pipe, tiny.model.model.model_config.unet_config)

    # ComfyUI 0.3.75's stock Load LoRA knows diffusers' UNet attention layers only in the old
    # attention-processor spelling (attn1.processor.to_q), not PEFT's (attn1.to_q): the pack's loader
    # reads both, so it stands for ComfyUI here; the TriLoRA itself goes through the stock loader.
    from_export = comfy_patched(comfy_host, tiny, name, "TriLoRALoader")
    from_trilora = comfy_patched(comfy_host, tiny, "diffusers_src.safetensors")
    base = {**tiny.model.model.state_dict(), **tiny.clip.cond_stage_model.state_dict()}
    for key, layer in adapted.items():  # diffusers' change is the TriLoRA's, exactly (float64 reference)
        exact = STRENGTH * layer.alpha / layer.rank * (layer.u.double() * layer.s.double()) @ layer.vt.double().flatten(1)
        change = (got[key].double() - base[key].double()).flatten(1)
        assert float((change - exact).norm() / exact.norm()) < 1e-5, key
    changed = 0
    for key, weight in got.items():
        tol = tolerance(key)
        torch.testing.assert_close(weight, from_export[key].float(), **tol, msg=lambda m, key=key: f"{key}: {m}")
        torch.testing.assert_close(from_export[key], from_trilora[key], **tol, msg=lambda m, key=key: f"{key}: {m}")
        changed += not torch.equal(from_trilora[key], base[key].to(from_trilora[key].dtype))
    assert changed == len(adapted)


def test_comfyui_names_are_comfyuis_own_and_patch_the_same_weights(comfy_host, tiny, adapted):
    name, info = export(comfy_host, "ComfyUI", "diffusers/comfy", tiny.model, tiny.clip)
    assert info.startswith("exported diffusers_src.safetensors as a ComfyUI LoRA: ")
    with safe_open(str(comfy_host.loras / name), framework="pt") as f:
        prefixes = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in f.keys()}
    assert all(p.startswith(("diffusion_model.", "text_encoders.clip_l.")) for p in prefixes)
    assert "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q" in prefixes
    want = comfy_patched(comfy_host, tiny, "diffusers_src.safetensors")
    got = comfy_patched(comfy_host, tiny, name)
    for key in want:
        torch.testing.assert_close(got[key], want[key], **tolerance(key), msg=lambda m, key=key: f"{key}: {m}")


def test_names_from_the_model_need_the_model(comfy_host, tiny, adapted):
    for fmt in ("diffusers / PEFT", "ComfyUI"):
        with pytest.raises(ValueError) as err:
            export(comfy_host, fmt, "diffusers/none")
        assert str(err.value) == (f"TriLoRAExportLoRA: format {fmt!r} takes its layer names from the model: connect "
                                  "the model (and the clip, for text-encoder layers) the adapter was made for")
        with pytest.raises(ValueError) as err:  # text-encoder layers, no clip connected
            export(comfy_host, fmt, "diffusers/none", tiny.model)
        assert str(err.value).startswith(f"TriLoRAExportLoRA: 12 layers have no {fmt} name in the connected model "
                                         "(first: lora_te_text_model_encoder_layers_0_")
    assert not list(comfy_host.loras.rglob("none_*"))


def test_a_flux_export_loads_in_diffusers_flux_transformer_with_comfyuis_weights(comfy_host):
    """Flux: diffusers splits ComfyUI's fused qkv (and single blocks' linear1) into to_q / to_k /
    to_v (/ proj_mlp): the export writes one LoRA per part, and FluxPipeline's own loader puts
    them back on a FluxTransformer2DModel with the tiny Flux's weights."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from tiny_models import tiny_model

    core = comfy_host.core
    flux = tiny_model("flux-dev").model
    config = flux.model.model_config.unet_config
    key_map = comfy.lora.model_lora_keys_unet(flux.model, {})
    names = core.diffusers_prefixes(key_map)
    ldm = flux.model.state_dict()
    g = torch.Generator().manual_seed(28)
    pack_names = core.prefixes_by_weight(key_map)
    adapted = {}
    for key in sorted(names):  # every matrix diffusers names: attention, feed-forward, embedders, modulation
        w = ldm.get(key)
        if w is None or w.ndim < 2:  # the map also names weights of Flux variants (control inputs) and norms
            continue
        adapted[key] = core.TriLoRALayer(torch.randn(w.shape[0], 2, generator=g) * 0.05, torch.rand(2, generator=g) + 0.5,
                                         torch.randn(2, *w.shape[1:], generator=g) * 0.05, 1.0)
    if not any(len(parts) == 4 for parts in names.values()):  # single blocks' linear1: q, k, v and the MLP
        # ComfyUI 0.33's key map has no diffusers names for a single block's fused linear1, so the
        # export cannot name it there (the pack's loaders still read such files on either version).
        pytest.skip("this ComfyUI's key map gives Flux single blocks' linear1 no diffusers (q, k, v, MLP) names")
    core.write_trilora(comfy_host.loras / "flux_src.safetensors", {pack_names[k]: v for k, v in adapted.items()}, {})
    name, _ = export(comfy_host, "diffusers / PEFT", "flux/peft", flux, source="flux_src.safetensors")

    to_ldm = comfy.utils.flux_to_diffusers(config, output_prefix="diffusion_model.")
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=config["in_channels"] * 4, num_layers=config["depth"],
        num_single_layers=config["depth_single_blocks"], attention_head_dim=config["hidden_size"] // config["num_heads"],
        num_attention_heads=config["num_heads"], joint_attention_dim=config["context_in_dim"],
        pooled_projection_dim=config["vec_in_dim"], guidance_embeds=True, axes_dims_rope=tuple(config["axes_dim"]))

    def diffusers_weight(source: dict, target) -> torch.Tensor:
        if isinstance(target, str):
            return source[target]
        weight = source[target[0]]
        if target[1] is not None:
            weight = weight.narrow(*target[1])
        return target[2](weight) if len(target) > 2 else weight

    state = {k: diffusers_weight(ldm, t).float() for k, t in to_ldm.items() if k in transformer.state_dict()}
    assert set(state) == set(transformer.state_dict())
    transformer.load_state_dict(state, strict=True)
    lora, alphas = FluxPipeline.lora_state_dict(str(comfy_host.loras / name), return_alphas=True)
    FluxPipeline.load_lora_into_transformer(lora, network_alphas=alphas, transformer=transformer)
    assert sum(hasattr(m, "lora_A") for m in transformer.modules()) == sum(k.endswith(".lora_A.weight") for k in lora)
    transformer.fuse_lora(lora_scale=STRENGTH)
    fused = {k.replace(".base_layer", ""): v for k, v in transformer.state_dict().items() if "lora_" not in k}

    patched = comfy_host.nodes.LoraLoaderModelOnly().load_lora_model_only(flux, "flux_src.safetensors", STRENGTH)[0]
    mm.load_models_gpu([patched])
    want = {k: v.detach().float().clone() for k, v in patched.model.state_dict().items()}
    mm.unload_all_models()
    for key, target in to_ldm.items():  # every diffusers weight against ComfyUI's rows of it
        if key in fused:
            torch.testing.assert_close(fused[key], diffusers_weight(want, target), rtol=1e-5, atol=1e-6,
                                       msg=lambda m, key=key: f"{key}: {m}")
    for key in adapted:
        assert not torch.equal(want[key], ldm[key].float()), key
