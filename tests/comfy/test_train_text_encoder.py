"""Text-encoder training in Train TriLoRA (text_encoder_lr, caption_dropout_rate, shuffle_caption,
keep_tokens) on the tiny SD1.5 checkpoint in the real ComfyUI (CPU; its CLIP-L is full size, so
runs are 1-2 steps): the CLIP's adapters train under kohya's lora_te_ names, ComfyUI's key map and
loaders apply them exactly, and resume, Export, Resize, Merge and Spectrum carry them."""
from __future__ import annotations

import json
from types import SimpleNamespace

import comfy.lora
import comfy.model_management as mm
import comfy.utils
import pytest
import torch
from conftest import COMFY, TINY
from test_dataset_chain import resolution_bucket
from test_train import CAPTIONS, make_images, run
from tiny_models import tiny_model

from harness.fixtures import workflow_models

NONE = "[None]"
TE = {"text_encoder_lr": 1e-3}


@pytest.fixture(scope="module")
def sd(comfy_host):
    nodes = comfy_host.nodes
    with torch.inference_mode():
        model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(TINY)[:3]
        latent = nodes.VAEEncode().encode(vae, make_images(4, seed=0))[0]
        conds = [nodes.CLIPTextEncode().encode(clip, c)[0] for c in CAPTIONS]
        empty = nodes.CLIPTextEncode().encode(clip, "")[0]
    return SimpleNamespace(model=model, clip=clip, vae=vae, latent=latent, conds=conds, empty=empty)


def train(comfy_host, sd, **inputs):
    """(MODEL, TRILORA, LOSS_MAP, steps, CLIP) of TrainTriLoRA on 4 images, a caption each, fp32."""
    inputs = {"steps": 1, "rank": 2, "alpha": 2.0, "seed": 0, "batch_size": 2, "training_dtype": "fp32",
              "gradient_checkpointing": False, "validate_every": 0, "preview_every": 0, **inputs}
    links = {k: inputs.pop(k) for k in ("latents", "positive", "captions", "clip") if k in inputs}
    links.setdefault("latents", [sd.latent])
    links.setdefault("positive", sd.conds)
    listed = {k: v if k in ("latents", "positive", "captions") else [v] for k, v in links.items()}
    return run(comfy_host, "TrainTriLoRA", model=[sd.model], **listed, **{k: [v] for k, v in inputs.items()})


def clip_state(clip) -> dict[str, bytes]:
    """Each CLIP tensor's bytes: compared bit for bit, since a weight the checkpoint does not hold
    (SD1.5's unused text_projection) keeps whatever memory ComfyUI gave it, NaN included, and NaN
    is never torch.equal to itself."""
    return {k: v.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()
            for k, v in clip.cond_stage_model.state_dict().items()}


def te_layers(trilora) -> dict:
    return {p: layer for p, layer in trilora.layers.items() if p.startswith("lora_te")}


def clip_weights(clip, keys) -> dict[str, torch.Tensor]:
    """The CLIP weights as ComfyUI patches them when it loads the CLIP for encoding."""
    mm.load_models_gpu([clip.patcher])
    out = {k: comfy.utils.get_attr(clip.cond_stage_model, k).detach().clone() for k in keys}
    mm.unload_all_models()
    return out


def te_weight_keys(clip, layers) -> dict[str, str]:
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})
    return {p: key_map[p] for p in layers}


def expected(original: torch.Tensor, layer, strength: float) -> torch.Tensor:
    delta = (layer.u.double() * layer.s.double()) @ layer.vt.double().flatten(1)
    return (original.double() + strength * layer.alpha / layer.rank * delta.reshape(original.shape)).to(original.dtype)


def assert_weights(got: dict, want: dict) -> None:
    for key, value in want.items():
        # the CPU text encoder is fp16: ComfyUI rounds the patched weight stochastically, one ulp either way
        torch.testing.assert_close(got[key], value, rtol=1e-3, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")


@pytest.fixture(scope="module")
def te_run(comfy_host, sd):
    """A 2-step text-encoder run with a checkpoint after step 1, and what the CLIP held before."""
    before = clip_state(sd.clip)
    out = train(comfy_host, sd, steps=2, clip=sd.clip, captions=CAPTIONS, checkpoint_every=1,
                checkpoint_prefix="te/run", shuffle_caption=True, keep_tokens=1, **TE)
    name = run(comfy_host, "SaveTriLoRA", trilora=out[1], filename_prefix="te/trained")[0]
    return SimpleNamespace(out=out, trilora=out[1], before=before, name=name)


def test_the_text_encoders_adapters_train_and_the_input_clip_stays_as_it_was(comfy_host, sd, te_run):
    trilora = te_run.trilora
    te = te_layers(trilora)
    # target_layers "attention": q, k, v and out_proj of CLIP-L's 12 layers, under kohya's SD1.5 names
    assert len(te) == 48 and all(p.startswith("lora_te_text_model_encoder_layers_") for p in te)
    assert {p.rsplit("_", 2)[-2] + "_" + p.rsplit("_", 1)[-1] for p in te} == {"q_proj", "k_proj", "v_proj",
                                                                                 "out_proj"}
    assert all(float(layer.s.abs().max()) > 0 for layer in te.values())  # s starts at 0: all learned
    assert len(trilora.layers) - len(te) == 32  # the UNet's attention layers beside them
    after = clip_state(sd.clip)
    assert after.keys() == te_run.before.keys()
    assert [k for k in after if after[k] != te_run.before[k]] == []
    assert te_run.out[3] == 2 and len(te_run.out[2]["loss"]) == 2
    meta = trilora.metadata
    assert (meta["ss_text_encoder_lr"], meta["ss_shuffle_caption"], meta["ss_keep_tokens"]) == ("0.001", "True", "1")
    assert json.loads(meta["trilora_training_args"])["text_encoder_lr"] == 1e-3


def test_every_te_key_of_the_file_is_in_comfyuis_key_map_and_the_clip_output_applies_it(comfy_host, sd, te_run):
    te = te_layers(te_run.trilora)
    keys = te_weight_keys(sd.clip, te)  # KeyError for a name ComfyUI's CLIP key map does not know
    _, _, info = run(comfy_host, "TriLoRALoader", model=sd.model, clip=sd.clip, trilora_name=te_run.name,
                     strength_model=1.0, strength_clip=1.0)
    total = len(te_run.trilora.layers)
    assert f"{total} of {total} layers matched (UNet 32, CLIP 48)" in info and "not matched" not in info
    originals = clip_weights(sd.clip, keys.values())
    got = clip_weights(te_run.out[4], keys.values())
    assert_weights(got, {keys[p]: expected(originals[keys[p]], layer, 1.0) for p, layer in te.items()})


def test_strength_clip_and_comfyuis_load_lora_on_the_export_apply_the_te_layers_exactly(comfy_host, sd, te_run):
    te = te_layers(te_run.trilora)
    keys = te_weight_keys(sd.clip, te)
    originals = clip_weights(sd.clip, keys.values())
    _, clip, _ = run(comfy_host, "TriLoRALoader", model=sd.model, clip=sd.clip, trilora_name=te_run.name,
                     strength_model=1.0, strength_clip=0.7)
    ours = clip_weights(clip, keys.values())
    assert_weights(ours, {keys[p]: expected(originals[keys[p]], layer, 0.7) for p, layer in te.items()})
    exported, info = run(comfy_host, "TriLoRAExportLoRA", trilora_name=te_run.name, filename_prefix="te/lora",
                         save_dtype="fp32", model=sd.model, clip=sd.clip)
    assert "80 layers" in info
    _, stock_clip = comfy_host.nodes.LoraLoader().load_lora(sd.model, sd.clip, exported, 1.0, 0.7)
    stock = clip_weights(stock_clip, keys.values())
    assert_weights(stock, ours)
    assert any(not torch.equal(stock[k], originals[k]) for k in keys.values())


def test_a_text_encoder_checkpoint_resumes_exactly(comfy_host, sd, te_run):
    first = sorted((comfy_host.loras / "te").glob("run_*_step000001.safetensors"))
    assert len(first) == 1 and first[0].with_suffix(".optim").exists()
    assert len(te_layers(comfy_host.core.read_trilora(first[0]))) == 48
    _, rest, loss, steps, _ = train(comfy_host, sd, steps=1, clip=sd.clip, captions=CAPTIONS,
                                    existing_lora=f"te/{first[0].name}", shuffle_caption=True, keep_tokens=1, **TE)
    assert steps == 2 and loss["loss"] == te_run.out[2]["loss"][1:]
    assert rest.layers.keys() == te_run.trilora.layers.keys()
    for prefix, layer in te_run.trilora.layers.items():
        other = rest.layers[prefix]
        assert torch.equal(layer.u, other.u) and torch.equal(layer.s, other.s) and torch.equal(layer.vt, other.vt)
    # The same file with the text encoder off would drop its te layers: refused, naming the setting.
    with pytest.raises(ValueError, match="holds 48 text-encoder layers .* Set text_encoder_lr above 0"):
        train(comfy_host, sd, existing_lora=f"te/{first[0].name}")


def test_resize_merge_and_spectrum_carry_the_te_layers(comfy_host, te_run):
    core = comfy_host.core
    te = te_layers(te_run.trilora)
    resized, _, info = run(comfy_host, "TriLoRAResize", trilora_name=te_run.name, filename_prefix="te/r1",
                           max_rank=1, energy=1.0, save_dtype="fp32")
    assert info.startswith(f"resized {te_run.name}: 80 layers, rank 2 -> rank 1")
    for prefix, layer in te.items():
        assert resized.layers[prefix].rank == 1
        assert torch.allclose(resized.layers[prefix].delta().double(), core.truncate(layer, rank=1).delta().double(),
                              rtol=1e-4, atol=1e-7)
    merged, _, _ = run(comfy_host, "TriLoRAMerge", filename_prefix="te/m", max_rank=0, energy=1.0, save_dtype="fp32",
                       trilora_name_1=te_run.name, weight_1=0.5, trilora_name_2=NONE, weight_2=1.0,
                       trilora_name_3=NONE, weight_3=1.0, trilora_name_4=NONE, weight_4=1.0)
    assert te_layers(merged).keys() == te.keys()
    for prefix, layer in te.items():
        assert torch.allclose(merged.layers[prefix].delta().double(), 0.5 * layer.delta().double(), rtol=1e-4,
                              atol=1e-7)
    _, text = run(comfy_host, "TriLoRASpectrum", trilora_name=te_run.name)
    assert any(line.startswith("Text encoder ") and line.split()[2] == "48" for line in text.splitlines()), text


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_the_text_encoders_train_in_the_half_precision_training_dtypes(comfy_host, sd, dtype):
    # fp16: the grad scaler scales the text encoders' gradients with the UNet's and unscales both.
    out = train(comfy_host, sd, steps=2, clip=sd.clip, captions=CAPTIONS, training_dtype=dtype, **TE)
    assert all(v == v for v in out[2]["loss"])
    assert all(float(layer.s.abs().max()) > 0 for layer in te_layers(out[1]).values())


def test_text_encoder_lr_0_is_the_unet_only_run_bit_for_bit(comfy_host, sd):
    plain = train(comfy_host, sd, steps=2)
    linked = train(comfy_host, sd, steps=2, clip=sd.clip, captions=CAPTIONS)
    assert plain[2]["loss"] == linked[2]["loss"]
    assert plain[1].layers.keys() == linked[1].layers.keys() and not te_layers(linked[1])
    for prefix, layer in plain[1].layers.items():
        other = linked[1].layers[prefix]
        assert torch.equal(layer.u, other.u) and torch.equal(layer.s, other.s) and torch.equal(layer.vt, other.vt)
    assert linked[4] is sd.clip and plain[4] is None  # the clip input passes through untouched
    assert "ss_text_encoder_lr" not in linked[1].metadata


def test_caption_dropout_1_trains_on_the_empty_caption(comfy_host, sd):
    # Captions encoded at every step (no text-encoder training) and all dropped: the run of the empty prompt.
    dropped = train(comfy_host, sd, steps=2, clip=sd.clip, captions=CAPTIONS, caption_dropout_rate=1.0)
    empty = train(comfy_host, sd, steps=2, positive=[sd.empty] * 4)
    assert dropped[2]["loss"] == pytest.approx(empty[2]["loss"], rel=1e-6)
    captioned = train(comfy_host, sd, steps=2)
    assert dropped[2]["loss"] != pytest.approx(captioned[2]["loss"], rel=1e-4)
    assert dropped[1].metadata["ss_caption_dropout_rate"] == "1.0"


def test_captions_encoded_at_every_step_pair_with_their_images_after_a_validation_split(comfy_host, sd):
    # shuffle_caption with every tag kept in place encodes each caption unchanged at every step: the run
    # of the conditionings as given, image by image, also when validation_split holds one image out.
    split = dict(steps=2, validation_split=0.25, seed=3)
    encoded = train(comfy_host, sd, clip=sd.clip, captions=CAPTIONS, shuffle_caption=True, keep_tokens=100, **split)
    given = train(comfy_host, sd, **split)
    assert encoded[2]["loss"] == pytest.approx(given[2]["loss"], rel=1e-6)
    other = ["a cat in the rain", "a dog", "a tree", "a house"]  # positive encoded from other text: taken as given
    retold = train(comfy_host, sd, clip=sd.clip, captions=other, shuffle_caption=True, keep_tokens=100, **split)
    assert retold[2]["loss"] != pytest.approx(given[2]["loss"], rel=1e-4)


def test_captions_out_of_the_images_order_are_refused(comfy_host, sd):
    # ComfyUI's Resolution Bucket regroups Make Training Dataset's images by size but has no captions
    # to regroup: the captions a user connects are then in the old order, another image's each.
    nodes = comfy_host.nodes
    with torch.inference_mode():
        latents = [nodes.VAEEncode().encode(sd.vae, make_images(1, seed=i, width=w))[0]
                   for i, w in enumerate([64, 128, 64])]
    bucketed, positive = resolution_bucket(latents, [[c[0]] for c in sd.conds[:3]])  # images 0, 2, then 1
    with pytest.raises(ValueError, match=r"captions are not in the images' order: caption 2 \('a green bar'\) is "
                                         r"image 3's positive, not image 2's"):
        train(comfy_host, sd, latents=bucketed, positive=positive, clip=sd.clip, captions=CAPTIONS[:3], **TE,
              checkpoint_every=1, checkpoint_prefix="te_order/run")
    assert not (comfy_host.loras / "te_order").exists()
    in_order = [CAPTIONS[0], CAPTIONS[2], CAPTIONS[1]]
    assert len(train(comfy_host, sd, latents=bucketed, positive=positive, clip=sd.clip, captions=in_order,
                     **TE)[2]["loss"]) == 1


def test_bad_inputs_are_named_before_step_1_and_nothing_is_trained(comfy_host, sd):
    cases = [
        (dict(**TE, captions=CAPTIONS), "text_encoder_lr 0.001 encodes the captions at every step, but clip is "
                                        "not connected"),
        (dict(**TE, clip=sd.clip), "but captions is not connected"),
        (dict(caption_dropout_rate=0.5, clip=sd.clip), "caption_dropout_rate 0.5 encodes the captions"),
        (dict(**TE, clip=sd.clip, captions=CAPTIONS[:3]), "captions has 3 captions for 4 images"),
        (dict(shuffle_caption=True, clip=sd.clip, captions=CAPTIONS + ["x"]), "captions has 5 captions for 4 images"),
        (dict(**TE, clip=sd.model, captions=CAPTIONS), "clip is not a CLIP"),
    ]
    for inputs, message in cases:
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            train(comfy_host, sd, checkpoint_every=1, checkpoint_prefix="te_bad/run", **inputs)
    assert not (comfy_host.loras / "te_bad").exists()


def test_a_clip_the_model_has_no_text_encoder_for_is_refused(comfy_host, sd):
    # SDXL's UNet takes CLIP-L + CLIP-G (2048-wide, pooled 1280); SD1.5's CLIP has CLIP-L alone.
    sdxl = tiny_model("sdxl")
    with pytest.raises(ValueError, match="clip does not fit this model: it encodes captions 768-wide .* positive "
                                         "is 2048-wide .* no such text encoder"):
        run(comfy_host, "TrainTriLoRA", model=[sdxl.model], latents=[sdxl.latent()], positive=[sdxl.conditioning()],
            clip=[sd.clip], captions=["a caption"], steps=[1], training_dtype=["fp32"], checkpoint_every=[1],
            checkpoint_prefix=["te_bad/sdxl"], **{k: [v] for k, v in TE.items()})
    assert not (comfy_host.loras / "te_bad").exists()


def test_sdxl_trains_clip_l_and_clip_g_under_kohyas_te1_and_te2_names(comfy_host):
    # The SDXL checkpoint of the workflow tests: the tiny SDXL UNet with full-size random CLIP-L and
    # CLIP-G (694M parameters: one step, one image).
    path = workflow_models.ensure(workflow_models.SDXL_CHECKPOINT, COMFY / "models")
    nodes = comfy_host.nodes
    with torch.inference_mode():
        model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(path.name)[:3]
        latent = nodes.VAEEncode().encode(vae, make_images(1, seed=0))[0]
        positive = nodes.CLIPTextEncode().encode(clip, CAPTIONS[0])[0]
    before = clip_state(clip)
    _, trilora, _, _, out_clip = run(comfy_host, "TrainTriLoRA", model=[model], latents=[latent], positive=[positive],
                                     clip=[clip], captions=CAPTIONS[:1], steps=[1], rank=[2], alpha=[2.0],
                                     training_dtype=["fp32"], gradient_checkpointing=[False], validate_every=[0],
                                     preview_every=[0], **{k: [v] for k, v in TE.items()})
    te = te_layers(trilora)
    te1 = {p: layer for p, layer in te.items() if p.startswith("lora_te1_")}
    te2 = {p: layer for p, layer in te.items() if p.startswith("lora_te2_")}
    assert (len(te1), len(te2), len(te)) == (48, 128, 176)  # q, k, v, out of CLIP-L's 12 and CLIP-G's 32 layers
    te_weight_keys(clip, te)  # every name is in ComfyUI's SDXL CLIP key map
    # CLIP-G: every layer learns, its last one through the pooled output alone (SDXL's y); CLIP-L:
    # SDXL takes its penultimate layer, so its last layer gets no gradient (as in kohya's SDXL runs).
    assert all(float(layer.s.abs().max()) > 0 for layer in te2.values())
    last = {p for p in te1 if "_layers_11_" in p}
    assert len(last) == 4 and all(float(te1[p].s.abs().max()) == 0 for p in last)
    assert all(float(layer.s.abs().max()) > 0 for p, layer in te1.items() if p not in last)
    after = clip_state(clip)
    assert [k for k in before if after[k] != before[k]] == []
    keys = te_weight_keys(clip, {p: te2[p] for p in sorted(te2)[:4]})
    originals = clip_weights(clip, keys.values())
    assert_weights(clip_weights(out_clip, keys.values()),
                   {keys[p]: expected(originals[keys[p]], te2[p], 1.0) for p in keys})
