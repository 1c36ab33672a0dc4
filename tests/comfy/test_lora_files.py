"""LoRA files as users bring them (kohya, diffusers/PEFT, LyCORIS/SimpleTuner, OneTrainer,
ComfyUI's own trainer; fp32 to fp8), loaded by the pack in the real ComfyUI and compared with what
ComfyUI's own LoraLoader patches; resumed by TrainTriLoRA; merged; refused with the kind named.
Inputs that once failed (a kohya file resumed, old diffusers attention-processor names) are here
with their right values."""
from __future__ import annotations

import math
from types import SimpleNamespace

import comfy.lora
import pytest
import torch
from conftest import run_node
from safetensors.torch import save_file
from trilora_files import LAYERS, weight, weights_restored

from harness.host import pack_module

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
SUFFIXES = {  # the LoRA factor namings ComfyUI's LoRA adapter reads: (up, down)
    "lora_up": (".lora_up.weight", ".lora_down.weight"),
    "lora_B": (".lora_B.weight", ".lora_A.weight"),
    "lora.up": (".lora.up.weight", ".lora.down.weight"),
    "processor": ("_lora.up.weight", "_lora.down.weight"),
    "lora_linear_layer": (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
    "lora_B.default": (".lora_B.default.weight", ".lora_A.default.weight"),
    "mochi": (".lora_B", ".lora_A"),
}


def _kohya_native(weight_key: str) -> str:
    return "lora_unet_" + weight_key.removeprefix("diffusion_model.").removesuffix(".weight").replace(".", "_")


# Prefix conventions, each picking the alias ComfyUI's own key map has for a weight.
PREFIXES = {
    "kohya": lambda a, w: a.startswith(("lora_unet_", "lora_te_")) and a != _kohya_native(w),
    "kohya_native": lambda a, w: a == _kohya_native(w) or a.startswith("lora_te_"),
    "lycoris": lambda a, w: a.startswith(("lycoris_", "lora_te_")),
    "comfyui": lambda a, w: a.startswith(("diffusion_model.", "text_encoders.")),
    "diffusers": lambda a, w: a.startswith(("unet.", "text_encoder.")),
}
# (prefix convention, factor naming): every convention and every naming at least once, as trainers write them.
NAMINGS = [
    ("kohya", "lora_up"), ("kohya_native", "lora_up"), ("lycoris", "lora_up"), ("comfyui", "lora_up"),
    ("comfyui", "lora_B"), ("diffusers", "lora_B"), ("diffusers", "lora.up"), ("diffusers", "processor"),
    ("diffusers", "lora_linear_layer"), ("comfyui", "lora_B.default"), ("comfyui", "mochi"),
]


@pytest.fixture(autouse=True)
def unload_after(tiny):
    yield from weights_restored(tiny)


@pytest.fixture(scope="module")
def key_maps(tiny):
    return {"unet": comfy.lora.model_lora_keys_unet(tiny.model.model, {}),
            "clip": comfy.lora.model_lora_keys_clip(tiny.clip.cond_stage_model, {})}


def prefix_in(key_maps, convention: str, part: str, weight_key: str) -> str:
    aliases = sorted(a for a, v in key_maps[part].items() if v == weight_key and PREFIXES[convention](a, weight_key))
    assert aliases, (convention, weight_key)
    return aliases[0]


def lora_tensors(tiny, key_maps, convention, naming, dtype, rank=3, alpha=1.5, seed=0, layers=LAYERS):
    """{file key: tensor} of a random LoRA over ``layers`` in one naming, factors and alpha in
    ``dtype`` (alpha as a one-element [1] tensor for float8, a scalar otherwise)."""
    g = torch.Generator().manual_seed(seed)
    up_suffix, down_suffix = SUFFIXES[naming]
    tensors = {}
    for part, key in layers.values():
        shape = weight(tiny, part, key).shape
        prefix = prefix_in(key_maps, convention, part, key)
        tensors[prefix + up_suffix] = (torch.randn(shape[0], rank, *([1] * (len(shape) - 2)), generator=g) * 0.1).to(dtype)
        tensors[prefix + down_suffix] = (torch.randn(rank, *shape[1:], generator=g) * 0.1).to(dtype)
        if alpha is not None:
            tensors[prefix + ".alpha"] = torch.tensor([alpha] if dtype.itemsize == 1 else alpha).to(dtype)
    return tensors


def computed(patcher, key: str) -> torch.Tensor:
    """The weight ``key`` as ComfyUI's ModelPatcher computes it when it loads the model (its
    comfy.lora.calculate_weight over the patches, in float32), without loading the whole model."""
    original = patcher.model.state_dict()[key]
    return comfy.lora.calculate_weight(patcher.patches.get(key, []), original.float().clone(), key)


def computed_weights(model, clip, keys=None) -> dict[str, torch.Tensor]:
    """{prefix or key: float32 weight} for LAYERS (or the given (part, key) pairs) on these patchers."""
    out = {}
    for name, (part, key) in (keys or LAYERS).items():
        out[name] = computed(model if part == "unet" else clip.patcher, key)
    return out


def lora_loader_weights(comfy_host, tiny, name, strength_model=1.0, strength_clip=1.0, keys=None):
    model, clip = comfy_host.nodes.LoraLoader().load_lora(tiny.model, tiny.clip, name, strength_model, strength_clip)
    return computed_weights(model, clip, keys)


def assert_same_weights(got, want, only=None):
    for prefix in only or want:
        torch.testing.assert_close(got[prefix], want[prefix], rtol=1e-5, atol=1e-6,
                                   msg=lambda m, p=prefix: f"{p}: {m}")


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("convention, naming", NAMINGS)
def test_every_naming_and_dtype_loads_as_lora_loader_patches_it(comfy_host, tiny, key_maps, unload_after,
                                                                convention, naming, dtype):
    name = f"table_{convention}_{naming}_{dtype}.safetensors"
    save_file(lora_tensors(tiny, key_maps, convention, naming, DTYPES[dtype]), str(comfy_host.loras / name))
    want = lora_loader_weights(comfy_host, tiny, name)
    assert not any(torch.equal(want[p], unload_after[k].float()) for p, (_, k) in LAYERS.items()), "LoraLoader: no change"
    model, clip, info = run_node(comfy_host, "TriLoRALoader", model=tiny.model, clip=tiny.clip, trilora_name=name,
                                 strength_model=1.0, strength_clip=1.0)
    assert "5 of 5 layers matched (UNet 4, CLIP 1); rank 3" in info, info
    assert_same_weights(computed_weights(model, clip), want)


# --------------------------------------------------------------------------- inputs that once failed, on SD1.5

def train_module(comfy_host):
    return pack_module(comfy_host, "nodes.training")


def train_node(comfy_host, model, latents, positive, **inputs):
    """TrainTriLoRA as the executor runs it (list inputs, inference mode), fp32 on the CPU."""
    inputs = {"steps": 1, "seed": 0, "training_dtype": "fp32", "gradient_checkpointing": False, **inputs}
    cls = comfy_host.nodes.NODE_CLASS_MAPPINGS["TrainTriLoRA"]
    with torch.inference_mode():
        out = cls.execute(model=[model], latents=latents, positive=positive, **{k: [v] for k, v in inputs.items()})
    return tuple(out.result)[:4]  # MODEL, TRILORA, LOSS_MAP, steps; the CLIP output: test_train_text_encoder.py


def file_deltas(core, path, key_map, shapes) -> dict[str, torch.Tensor]:
    """{weight key: delta} of a file, each layer resolved through ComfyUI's key map."""
    resolved = core.layers_by_weight(core.read_adapter_file(str(path)).layers, key_map, shapes)
    return {w: layer.delta(torch.float64) for w, layer in resolved.layers.items()}


def resumed_deltas(comfy_host, model, name) -> dict[str, torch.Tensor]:
    """{weight key: delta} TrainTriLoRA starts from when existing_lora is ``name``."""
    train = train_module(comfy_host)
    targets, start = train.resume_start(SimpleNamespace(existing_lora=name), model.clone())
    return {f"{t.name}.weight": start.layers[t.prefix].delta(torch.float64) for t in targets}


def unet_shapes(model) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.model.state_dict().items()}


def assert_deltas(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6 * float(value.abs().max()), msg=key)


KOHYA_RESUME = {  # a kohya file (diffusers-style block names) resumed by TrainTriLoRA
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
        "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_v":
        "diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_v.weight",
    "lora_unet_up_blocks_0_attentions_1_transformer_blocks_0_ff_net_2":
        "diffusion_model.output_blocks.1.1.transformer_blocks.0.ff.net.2.weight",
}


def test_training_resumes_from_a_kohya_lora(comfy_host, tiny, key_maps):
    """Issue 13, input 1: a kohya-named rank-4, alpha-4 LoRA as existing_lora: training goes on
    on those 3 layers, from the file's exact delta."""
    g = torch.Generator().manual_seed(1)
    shapes = unet_shapes(tiny.model)
    tensors = {}
    for prefix, key in KOHYA_RESUME.items():
        assert key_maps["unet"][prefix] == key
        tensors[f"{prefix}.lora_up.weight"] = torch.randn(shapes[key][0], 4, generator=g) * 0.1
        tensors[f"{prefix}.lora_down.weight"] = torch.randn(4, shapes[key][1], generator=g) * 0.1
        tensors[f"{prefix}.alpha"] = torch.tensor(4.0)
    save_file(tensors, str(comfy_host.loras / "kohya_resume.safetensors"))
    want = file_deltas(comfy_host.core, comfy_host.loras / "kohya_resume.safetensors", key_maps["unet"], shapes)
    assert_deltas(resumed_deltas(comfy_host, tiny.model, "kohya_resume.safetensors"), want)

    _, trilora, loss, steps = train_node(comfy_host, tiny.model, [tiny.latent(2)], tiny.conditioning(),
                                        existing_lora="kohya_resume.safetensors", learning_rate=1e-9)
    assert steps == 1 and len(loss["loss"]) == 1
    trained = {key_maps["unet"][p]: layer.delta(torch.float64) for p, layer in trilora.layers.items()}
    assert_deltas(trained, want)  # a step of 1e-9 moves nothing that shows at this tolerance


@pytest.mark.parametrize("convention, naming", NAMINGS)
def test_training_resumes_from_every_naming(comfy_host, tiny, key_maps, convention, naming):
    unet = {p: v for p, v in LAYERS.items() if v[0] == "unet"}
    name = f"resume_{convention}_{naming}.safetensors"
    save_file(lora_tensors(tiny, key_maps, convention, naming, torch.bfloat16, layers=unet),
              str(comfy_host.loras / name))
    want = file_deltas(comfy_host.core, comfy_host.loras / name, key_maps["unet"], unet_shapes(tiny.model))
    assert len(want) == len(unet)
    assert_deltas(resumed_deltas(comfy_host, tiny.model, name), want)


PROCESSOR_FILE = {  # old diffusers attention-processor names, rank 4, no alpha
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora":
        ("unet", "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"),
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora":
        ("unet", "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_out.0.weight"),
    "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer":
        ("clip", "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"),
}


def test_old_diffusers_processor_names_load_as_lora_loader_loads_them(comfy_host, tiny):
    g = torch.Generator().manual_seed(2)
    tensors = {}
    for stem, (part, key) in PROCESSOR_FILE.items():
        shape = weight(tiny, part, key).shape
        tensors[f"{stem}.up.weight"] = torch.randn(shape[0], 4, generator=g) * 0.1
        tensors[f"{stem}.down.weight"] = torch.randn(4, shape[1], generator=g) * 0.1
    save_file(tensors, str(comfy_host.loras / "processor.safetensors"))
    want = lora_loader_weights(comfy_host, tiny, "processor.safetensors", keys=PROCESSOR_FILE)
    model, clip, info = run_node(comfy_host, "TriLoRALoader", model=tiny.model, clip=tiny.clip,
                                 trilora_name="processor.safetensors", strength_model=1.0, strength_clip=1.0)
    assert "3 of 3 layers matched (UNet 2, CLIP 1); rank 4" in info, info
    assert_same_weights(computed_weights(model, clip, PROCESSOR_FILE), want)

    model, info = run_node(comfy_host, "TriLoRALoaderModelOnly", model=tiny.model,
                           trilora_name="processor.safetensors", strength_model=1.0)
    unet = {s: v for s, v in PROCESSOR_FILE.items() if v[0] == "unet"}
    assert_same_weights(computed_weights(model, None, unet), want, only=unet)
    assert "2 of 3 layers matched (UNet 2)" in info and "1 text-encoder layers not applied by this node" in info


def test_non_finite_training_inputs_are_named_before_step_1(comfy_host, tiny):
    """Issue 13, input 3: one NaN in image 2 of a [2, 4, 8, 8] LATENT (a failed VAE encode)."""
    latent = tiny.latent(2)
    latent["samples"][1, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError) as err:
        train_node(comfy_host, tiny.model, [latent], tiny.conditioning())
    assert str(err.value) == ("TrainTriLoRA: latents item 1, image 2 of 2, holds NaN or infinite values (a failed "
                              "VAE encode gives them); encode that image again or leave it out")
    cond = tiny.conditioning()
    cond[0][0][0, 2, 5] = float("inf")
    with pytest.raises(ValueError) as err:
        train_node(comfy_host, tiny.model, [tiny.latent(2)], [tiny.conditioning(1), cond])
    assert str(err.value) == ("TrainTriLoRA: positive item 2 holds NaN or infinite values in its cond tensor; "
                              "encode that prompt again")


def adapter_of_kind(kind: str, prefix: str, shape) -> dict:
    out, inp = shape[0], shape[1]
    lora = {f"{prefix}.lora_A.weight": torch.ones(2, inp), f"{prefix}.lora_B.weight": torch.ones(out, 2)}
    return {
        "DoRA (PEFT lora_magnitude_vector)": {**lora, f"{prefix}.lora_magnitude_vector": torch.ones(out)},
        "DoRA (LyCORIS dora_scale)": {**lora, f"{prefix}.dora_scale": torch.ones(out, 1)},
        "LoHa": {f"{prefix}.hada_w1_a": torch.ones(out, 2), f"{prefix}.hada_w1_b": torch.ones(2, inp),
                 f"{prefix}.hada_w2_a": torch.ones(out, 2), f"{prefix}.hada_w2_b": torch.ones(2, inp)},
        "LoKr": {f"{prefix}.lokr_w1": torch.ones(4, 4), f"{prefix}.lokr_w2": torch.ones(out // 4, inp // 4)},
        "OFT/BOFT": {f"{prefix}.oft_blocks": torch.zeros(4, out // 4, out // 4)},
        "GLoRA": {f"{prefix}.a1.weight": torch.ones(2, inp), f"{prefix}.a2.weight": torch.ones(out, 2),
                  f"{prefix}.b1.weight": torch.ones(2, inp), f"{prefix}.b2.weight": torch.ones(out, 2)},
        "IA3": {f"{prefix}.weight": torch.ones(out), f"{prefix}.on_input": torch.tensor(False)},
        "full-weight diff": {f"{prefix}.diff": torch.zeros(out, inp), f"{prefix}.diff_b": torch.zeros(out)},
    }[kind]


@pytest.mark.parametrize("kind", ["DoRA (PEFT lora_magnitude_vector)", "DoRA (LyCORIS dora_scale)", "LoHa", "LoKr",
                                  "OFT/BOFT", "GLoRA", "IA3", "full-weight diff"])
def test_other_adapter_kinds_are_refused_by_name_and_nothing_is_applied(comfy_host, tiny, kind):
    """Issue 13, input 4 (DoRA in PEFT naming) and its kind: every adapter the pack cannot convert."""
    prefix = "unet.down_blocks.0.attentions.0.proj_in"
    name = f"kind_{kind.split()[0].replace('/', '_')}_{len(kind)}.safetensors"
    save_file(adapter_of_kind(kind, prefix, (320, 320)), str(comfy_host.loras / name))
    for node, inputs in (("TriLoRALoader", {"clip": tiny.clip, "strength_clip": 1.0}), ("TriLoRALoaderModelOnly", {})):
        with pytest.raises(comfy_host.core.TriLoRAFileError) as err:
            run_node(comfy_host, node, model=tiny.model, trilora_name=name, strength_model=1.0, **inputs)
        assert name in str(err.value) and f"this is a {kind}" in str(err.value), str(err.value)
        assert "load it with ComfyUI's LoraLoader" in str(err.value)
        assert not tiny.model.patches and not tiny.clip.patcher.patches


def test_a_text_encoder_only_lora_leaves_the_model_alone_in_the_model_only_loader(comfy_host, tiny):
    """Issue 13, input 5."""
    g = torch.Generator().manual_seed(3)
    tensors = {}
    for layer, (out, inp) in (("self_attn_q_proj", (768, 768)), ("mlp_fc1", (3072, 768))):
        prefix = f"lora_te_text_model_encoder_layers_{0 if 'attn' in layer else 3}_{layer}"
        tensors[f"{prefix}.lora_up.weight"] = torch.randn(out, 2, generator=g)
        tensors[f"{prefix}.lora_down.weight"] = torch.randn(2, inp, generator=g)
    save_file(tensors, str(comfy_host.loras / "te_only.safetensors"))
    model, info = run_node(comfy_host, "TriLoRALoaderModelOnly", model=tiny.model, trilora_name="te_only.safetensors",
                           strength_model=1.0)
    assert model is tiny.model
    assert info.endswith("0 of 2 layers matched (UNet 0); the file holds only text-encoder layers (2), which this "
                         "node does not apply"), info


def comfy_trained_file(tiny, key_maps, parts) -> tuple[dict, dict]:
    """A file as ComfyUI's TrainLoraNode writes it (ComfyUI-native names): LoRA factors for
    matrices, .diff for 1-D weights (norms), .diff_b for biases. Returns (tensors, {name: (part, key)})."""
    g = torch.Generator().manual_seed(4)
    tensors, touched = {}, {}
    for part, weight_key, kind in parts:
        stem = weight_key.removesuffix(".weight")
        shape = tiny.model.model.state_dict()[weight_key].shape
        if kind == "lora":
            tensors[f"{stem}.lora_up.weight"] = torch.randn(shape[0], 2, generator=g) * 0.1
            tensors[f"{stem}.lora_down.weight"] = torch.randn(2, math.prod(shape[1:]), generator=g) * 0.1
            tensors[f"{stem}.alpha"] = torch.tensor(1.0)
            touched[stem] = (part, weight_key)
        elif kind == "diff":
            tensors[f"{stem}.diff"] = torch.randn(shape, generator=g) * 0.1
            touched[stem + ".diff"] = (part, weight_key)
        tensors[f"{stem}.diff_b"] = torch.randn(shape[0], generator=g) * 0.1
        touched[stem + ".diff_b"] = (part, f"{stem}.bias")
    return tensors, touched


def test_a_comfyui_trained_lora_applies_as_lora_loader_applies_it(comfy_host, tiny, key_maps):
    """Issue 13, input 8 on SD1.5: LoRA factors plus the .diff / .diff_b entries TrainLoraNode writes."""
    tensors, touched = comfy_trained_file(tiny, key_maps, [
        ("unet", "diffusion_model.input_blocks.1.1.proj_in.weight", "lora"),
        ("unet", "diffusion_model.input_blocks.1.1.transformer_blocks.0.norm1.weight", "diff"),
        ("unet", "diffusion_model.input_blocks.1.0.in_layers.2.weight", "lora"),
    ])
    save_file(tensors, str(comfy_host.loras / "comfy_trained.safetensors"))
    model, clip = comfy_host.nodes.LoraLoader().load_lora(tiny.model, tiny.clip, "comfy_trained.safetensors", 0.7, 1.0)
    want = computed_weights(model, clip, touched)
    model, clip, info = run_node(comfy_host, "TriLoRALoader", model=tiny.model, clip=tiny.clip,
                                 trilora_name="comfy_trained.safetensors", strength_model=0.7, strength_clip=1.0)
    assert_same_weights(computed_weights(model, clip, touched), want)
    assert "2 of 2 layers matched (UNet 2, CLIP 0); rank 2; 4 full-weight diffs" in info, info
    assert "applied as ComfyUI's LoraLoader applies them (UNet 4)" in info


def test_merge_adds_one_weight_under_two_names(comfy_host, tiny, key_maps):
    """Aliases across merged files: the exact weighted sum under one name."""
    unet = {p: v for p, v in LAYERS.items() if v[0] == "unet"}
    save_file(lora_tensors(tiny, key_maps, "kohya", "lora_up", torch.float32, seed=5, layers=unet),
              str(comfy_host.loras / "alias_a.safetensors"))
    save_file(lora_tensors(tiny, key_maps, "diffusers", "lora_B", torch.float32, seed=6, layers=unet),
              str(comfy_host.loras / "alias_b.safetensors"))
    trilora, _, info = run_node(comfy_host, "TriLoRAMerge", filename_prefix="trilora/alias_merge",
                                trilora_name_1="alias_a.safetensors", weight_1=1.0,
                                trilora_name_2="alias_b.safetensors", weight_2=-0.5, max_rank=0, energy=1.0,
                                save_dtype="fp32")
    assert len(trilora.layers) == len(unet) and info.count("adapt one weight: added") == len(unet), info
    shapes = unet_shapes(tiny.model)
    a = file_deltas(comfy_host.core, comfy_host.loras / "alias_a.safetensors", key_maps["unet"], shapes)
    b = file_deltas(comfy_host.core, comfy_host.loras / "alias_b.safetensors", key_maps["unet"], shapes)
    merged = comfy_host.core.layers_by_weight(trilora.layers, key_maps["unet"], shapes)
    assert_deltas({w: layer.delta(torch.float64) for w, layer in merged.layers.items()},
                  {w: a[w] - 0.5 * b[w] for w in a})


def test_one_weight_under_two_names_in_one_file_is_their_sum_everywhere(comfy_host, tiny, key_maps):
    """A loader never applies one alias and drops the other (ComfyUI's LoraLoader keeps the last);
    Resize and Spectrum see one weight."""
    key = "diffusion_model.input_blocks.1.1.proj_in.weight"
    names = ("lora_unet_down_blocks_0_attentions_0_proj_in", "unet.down_blocks.0.attentions.0.proj_in")
    g = torch.Generator().manual_seed(9)
    tensors, want = {}, torch.zeros(320, 320, dtype=torch.float64)
    for prefix in names:
        up, down = torch.randn(320, 2, 1, 1, generator=g) * 0.1, torch.randn(2, 320, 1, 1, generator=g) * 0.1
        tensors |= {f"{prefix}.lora_up.weight": up, f"{prefix}.lora_down.weight": down}
        want += up.double().flatten(1) @ down.double().flatten(1)
    save_file(tensors, str(comfy_host.loras / "two_names.safetensors"))
    model, info = run_node(comfy_host, "TriLoRALoaderModelOnly", model=tiny.model, trilora_name="two_names.safetensors",
                           strength_model=1.0)
    assert f"{names[0]} and {names[1]} adapt the same weight: applied as their sum" in info, info
    delta = computed(model, key).double() - tiny.model.model.state_dict()[key].double()
    torch.testing.assert_close(delta.flatten(1), want, rtol=1e-4, atol=1e-6)

    resized, _, info = run_node(comfy_host, "TriLoRAResize", trilora_name="two_names.safetensors",
                                filename_prefix="trilora/two_names", max_rank=0, energy=1.0, save_dtype="fp32")
    assert list(resized.layers) == [names[0]] and "adapt one weight: saved as their sum" in info
    torch.testing.assert_close(resized.layers[names[0]].delta(torch.float64).flatten(1), want, rtol=1e-5, atol=1e-7)
    _, summary = run_node(comfy_host, "TriLoRASpectrum", trilora_name="two_names.safetensors")
    assert "1 layers" in summary, summary
