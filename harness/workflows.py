"""The workflow files in workflows/, described as plain data: nodes (type, position, widget values
by name) and links (from node, output name, to node, input name); widgets not named keep the
node's defaults. The real frontend turns a spec into the UI-format file (harness.browser's
ComfyBrowser.build): scripts/make_workflows.py writes them, and tests/e2e/test_browser.py checks
that the committed files are what today's nodes build.
"""
from __future__ import annotations

import uuid

PACK_URL = "https://github.com/comfyui-trilora/comfyui-trilora/workflows/"
CHECKPOINT = "v1-5-pruned-emaonly.safetensors"   # the SD1.5 file most users have
TRAINED_PREFIX = "trilora_sample_style"         # Save TriLoRA's filename_prefix in the training workflow
TRAINED = f"{TRAINED_PREFIX}_00001_.safetensors"  # what its first run saves into models/loras
STYLE_PROMPT = ("trlstyle, flat geometric illustration of a large red circle and a small blue square "
                "on a cream background, thick black frame")
NEGATIVE = "photo, realistic, blurry, text, watermark"
NOTE_COLOR = ["#432", "#653"]
PREVIEW_STRENGTHS = (0.0, 0.5, 1.0)

GENERATE_NOTE = f"""GENERATE WITH A TRILORA (comfyui-trilora)

Load Checkpoint -> Load TriLoRA -> prompts -> KSampler -> Save Image.

What to change:
- Load Checkpoint: your SD1.5 model ({CHECKPOINT} is the usual file).
- Load TriLoRA: trilora_name is a file in your models/loras folder. {TRAINED} is what the "train a style" workflow saves on its first run. A plain LoRA/LoCon file works too: it is converted exactly.
- strength_model / strength_clip: 1.0 applies the TriLoRA as trained, 0 turns it off, negative values push the other way.
- max_rank / energy: keep only each layer's strongest directions (0 and 1.0 keep everything).
- The prompt: the sample style's trigger word is "trlstyle".
"""

TRAIN_NOTE = f"""TRAIN A STYLE WITH TRILORA (comfyui-trilora)

Training images + captions -> VAE Encode / CLIP Text Encode -> Train TriLoRA -> Save TriLoRA, with the loss graph and previews of the result at strengths {", ".join(map(str, PREVIEW_STRENGTHS))}.

What to change:
- Load Training Images: an empty folder means the 8 sample pictures that ship with the pack (their captions start with "trlstyle"). For your own style, put images with .txt captions of the same name in a folder and give its path. size: 512 for SD1.5.
- Load Checkpoint: your SD1.5 model ({CHECKPOINT} is the usual file).
- Train TriLoRA: steps, rank and learning_rate. A few hundred steps on a GPU make a visible style. training_dtype: bf16 saves memory on recent GPUs; use fp32 on a CPU.
- Save TriLoRA writes {TRAINED} into models/loras (the counter grows with each run), ready for the "generate" workflow.
- Training curves: the loss, and every validate_every steps the base drift (how much the prompt-free prediction moved) and, with validation_split above 0, the error on held-out images; keep_best keeps the best step.
"""


def generation_spec() -> dict:
    return {
        "nodes": [
            {"key": "note", "type": "Note", "title": "Read me: generate with a TriLoRA", "pos": [20, 20],
             "size": [460, 300], "color": NOTE_COLOR,
             "widgets": {"text": GENERATE_NOTE}},
            {"key": "ckpt", "type": "CheckpointLoaderSimple", "pos": [20, 400], "size": [320, 0],
             "widgets": {"ckpt_name": CHECKPOINT}},
            {"key": "lora", "type": "TriLoRALoader", "pos": [520, 20], "size": [360, 0],
             "widgets": {"trilora_name": TRAINED, "strength_model": 1.0, "strength_clip": 1.0}},
            {"key": "pos", "type": "CLIPTextEncode", "pos": [520, 280], "size": [400, 150],
             "title": "Positive prompt", "widgets": {"text": STYLE_PROMPT}},
            {"key": "neg", "type": "CLIPTextEncode", "pos": [520, 470], "size": [400, 110],
             "title": "Negative prompt", "widgets": {"text": NEGATIVE}},
            {"key": "latent", "type": "EmptyLatentImage", "pos": [520, 620],
             "widgets": {"width": 512, "height": 512, "batch_size": 1}},
            {"key": "sampler", "type": "KSampler", "pos": [960, 20],
             "widgets": {"seed": 42, "control_after_generate": "fixed", "steps": 25, "cfg": 7.0,
                         "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
            {"key": "decode", "type": "VAEDecode", "pos": [960, 340]},
            {"key": "save", "type": "SaveImage", "pos": [1260, 20], "size": [420, 460],
             "widgets": {"filename_prefix": "trilora/generate"}},
        ],
        "links": [
            ["ckpt", "MODEL", "lora", "model"], ["ckpt", "CLIP", "lora", "clip"],
            ["lora", "CLIP", "pos", "clip"], ["lora", "CLIP", "neg", "clip"],
            ["lora", "MODEL", "sampler", "model"], ["pos", "CONDITIONING", "sampler", "positive"],
            ["neg", "CONDITIONING", "sampler", "negative"], ["latent", "LATENT", "sampler", "latent_image"],
            ["sampler", "LATENT", "decode", "samples"], ["ckpt", "VAE", "decode", "vae"],
            ["decode", "IMAGE", "save", "images"],
        ],
    }


def training_spec() -> dict:
    # Row 1: data -> training -> save and loss graph. Row 2: previews at several strengths.
    nodes = [
        {"key": "note", "type": "Note", "title": "Read me: train a style", "pos": [20, 20], "size": [480, 380],
         "color": NOTE_COLOR, "widgets": {"text": TRAIN_NOTE}},
        {"key": "ckpt", "type": "CheckpointLoaderSimple", "pos": [560, 80], "size": [300, 0],
         "widgets": {"ckpt_name": CHECKPOINT}},
        {"key": "images", "type": "TriLoRASampleImages", "pos": [560, 250], "size": [300, 0],
         "widgets": {"folder": "", "size": 512}},
        {"key": "encode", "type": "VAEEncode", "pos": [900, 80]},
        {"key": "captions", "type": "CLIPTextEncode", "title": "Encode captions", "pos": [900, 200],
         "size": [220, 60]},
        {"key": "train", "type": "TrainTriLoRA", "pos": [1180, 80], "size": [420, 0],
         "widgets": {"steps": 300, "rank": 8, "learning_rate": 0.001, "seed": 0,
                     "control_after_generate": "fixed", "alpha": 8.0,
                     "batch_size": 1, "training_dtype": "bf16", "gradient_checkpointing": True}},
        {"key": "save", "type": "SaveTriLoRA", "pos": [1660, 80], "size": [380, 0],
         "widgets": {"filename_prefix": TRAINED_PREFIX}},
        {"key": "loss", "type": "LossGraphNode", "pos": [1660, 230], "size": [380, 330],
         "widgets": {"filename_prefix": "trilora_loss"}},
        {"key": "curves", "type": "TriLoRATrainingCurves", "pos": [1660, 600], "size": [380, 0]},
        {"key": "curves_image", "type": "PreviewImage", "title": "Training curves: loss, held-out, drift",
         "pos": [1660, 680], "size": [380, 240]},
        {"key": "pos", "type": "CLIPTextEncode", "title": "Preview prompt", "pos": [20, 1020], "size": [420, 150],
         "widgets": {"text": STYLE_PROMPT}},
        {"key": "neg", "type": "CLIPTextEncode", "title": "Preview negative prompt", "pos": [20, 1220],
         "size": [420, 90], "widgets": {"text": NEGATIVE}},
        {"key": "latent", "type": "EmptyLatentImage", "pos": [20, 1360], "size": [420, 0],
         "widgets": {"width": 512, "height": 512, "batch_size": 1}},
    ]
    links = [
        ["images", "images", "encode", "pixels"], ["ckpt", "VAE", "encode", "vae"],
        ["images", "captions", "captions", "text"], ["ckpt", "CLIP", "captions", "clip"],
        ["ckpt", "MODEL", "train", "model"], ["encode", "LATENT", "train", "latents"],
        ["captions", "CONDITIONING", "train", "positive"],
        ["train", "TRILORA", "save", "trilora"], ["train", "LOSS_MAP", "loss", "loss"],
        ["train", "LOSS_MAP", "curves", "loss_map"], ["curves", "curves", "curves_image", "images"],
        ["ckpt", "CLIP", "pos", "clip"], ["ckpt", "CLIP", "neg", "clip"],
    ]
    previews = []
    for i, strength in enumerate(PREVIEW_STRENGTHS):
        x, k = 500 + i * 520, f"_{i}"
        nodes += [
            {"key": "apply" + k, "type": "ApplyTriLoRA", "title": f"Apply TriLoRA (strength {strength})",
             "pos": [x, 1020], "size": [260, 0], "widgets": {"strength": strength}},
            {"key": "sampler" + k, "type": "KSampler", "pos": [x, 1140], "size": [260, 0],
             "widgets": {"seed": 42, "control_after_generate": "fixed", "steps": 25, "cfg": 7.0,
                         "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
            {"key": "decode" + k, "type": "VAEDecode", "pos": [x + 290, 1020], "size": [200, 0]},
            {"key": "preview" + k, "type": "PreviewImage", "title": f"Preview: strength {strength}",
             "pos": [x + 290, 1120], "size": [200, 280]},
        ]
        links += [
            ["ckpt", "MODEL", "apply" + k, "model"], ["train", "TRILORA", "apply" + k, "trilora"],
            ["apply" + k, "MODEL", "sampler" + k, "model"], ["pos", "CONDITIONING", "sampler" + k, "positive"],
            ["neg", "CONDITIONING", "sampler" + k, "negative"], ["latent", "LATENT", "sampler" + k, "latent_image"],
            ["sampler" + k, "LATENT", "decode" + k, "samples"], ["ckpt", "VAE", "decode" + k, "vae"],
            ["decode" + k, "IMAGE", "preview" + k, "images"],
        ]
        previews += ["apply" + k, "sampler" + k, "decode" + k, "preview" + k]
    groups = [
        {"title": "1. Training images and captions", "members": ["ckpt", "images", "encode", "captions"]},
        {"title": "2. Train, save, loss graph and training curves",
         "members": ["train", "save", "loss", "curves", "curves_image"]},
        {"title": "3. Previews at strengths " + ", ".join(map(str, PREVIEW_STRENGTHS)),
         "members": ["pos", "neg", "latent", *previews]},
    ]
    return {"nodes": nodes, "links": links, "groups": groups}


TOOLS_NOTE = f"""TriLoRA tools (comfyui-trilora)

1. Bake a LoRA stack into one TriLoRA: Extract TriLoRA compares the
   model with your LoRAs applied against the plain checkpoint, layer by
   layer (the best approximation of the chosen rank). TriLoRA Spectrum
   plots each layer's singular values; Resize cuts the rank; Export
   writes a standard kohya LoRA for any other tool.
2. Convert a LoRA/LoCon file to TriLoRA exactly; merge with weights.
3. Load TriLoRA (Block Weights): a strength per UNet block group
   (input, middle, output) and for the text encoder.

What to change:
- Load Checkpoint: your SD1.5 model ({CHECKPOINT}
  is the usual file).
- Your LoRA stack / Convert / Block Weights: any LoRA or TriLoRA file
  in models/loras ({TRAINED} is
  what the "train a style" workflow saves). Chain more Load LoRA nodes
  before Extract to bake them all into one file.
- Extract: rank (per layer) or energy (share of the change to keep).
- Resize: max_rank / energy. Merge: the weight of each input.
- filename_prefix: new files go to models/loras; none is replaced.
"""


def tools_spec() -> dict:
    T = TRAINED
    nodes = [
        {"key": "note", "type": "Note", "pos": [20, 20], "size": [470, 520], "color": NOTE_COLOR,
         "widgets": {"text": TOOLS_NOTE}},
        {"key": "ckpt", "type": "CheckpointLoaderSimple", "pos": [20, 600], "widgets": {"ckpt_name": CHECKPOINT}},
        {"key": "lora", "type": "LoraLoader", "pos": [20, 760], "size": [400, 0], "title": "Your LoRA stack",
         "widgets": {"lora_name": T, "strength_model": 1.0, "strength_clip": 1.0}},
        {"key": "extract", "type": "TriLoRAExtract", "pos": [540, 70], "size": [360, 0],
         "widgets": {"filename_prefix": "trilora/extracted", "rank": 32, "energy": 1.0}},
        {"key": "spectrum", "type": "TriLoRASpectrum", "pos": [960, 70], "size": [300, 0]},
        {"key": "plot", "type": "PreviewImage", "pos": [1320, 70], "size": [520, 420]},
        {"key": "summary", "type": "PreviewAny", "pos": [1320, 540], "size": [520, 240]},
        {"key": "resize", "type": "TriLoRAResize", "pos": [960, 300], "size": [300, 0],
         "widgets": {"filename_prefix": "trilora/resized", "max_rank": 8, "energy": 1.0}},
        {"key": "export", "type": "TriLoRAExportLoRA", "pos": [960, 560], "size": [300, 0],
         "widgets": {"filename_prefix": "trilora/kohya_lora"}},
        {"key": "exported", "type": "PreviewAny", "pos": [960, 820], "size": [300, 120]},
        {"key": "convert", "type": "TriLoRAConvertLoRA", "pos": [540, 1070], "size": [360, 0],
         "widgets": {"lora_name": T, "filename_prefix": "trilora/converted"}},
        {"key": "merge", "type": "TriLoRAMerge", "pos": [960, 1070], "size": [320, 0],
         "widgets": {"filename_prefix": "trilora/merged", "weight_1": 0.7, "weight_2": 0.3, "max_rank": 0}},
        {"key": "blocks", "type": "TriLoRALoaderBlockWeights", "pos": [1360, 1070], "size": [360, 0],
         "widgets": {"trilora_name": T, "input_blocks": 1.0, "middle_block": 0.5, "output_blocks": 1.0,
                     "text_encoder": 1.0}},
        {"key": "blocks_info", "type": "PreviewAny", "pos": [1780, 1070], "size": [320, 120]},
    ]
    links = [
        ["ckpt", "MODEL", "lora", "model"], ["ckpt", "CLIP", "lora", "clip"],
        ["lora", "MODEL", "extract", "model_finetuned"], ["ckpt", "MODEL", "extract", "model_base"],
        ["lora", "CLIP", "extract", "clip_finetuned"], ["ckpt", "CLIP", "extract", "clip_base"],
        ["extract", "TRILORA", "spectrum", "trilora"],
        ["spectrum", "spectrum", "plot", "images"], ["spectrum", "summary", "summary", "source"],
        ["extract", "TRILORA", "resize", "trilora"],
        ["resize", "TRILORA", "export", "trilora"],
        ["ckpt", "MODEL", "export", "model"], ["ckpt", "CLIP", "export", "clip"],
        ["export", "info", "exported", "source"],
        ["convert", "TRILORA", "merge", "trilora_1"], ["extract", "TRILORA", "merge", "trilora_2"],
        ["ckpt", "MODEL", "blocks", "model"], ["ckpt", "CLIP", "blocks", "clip"],
        ["blocks", "info", "blocks_info", "source"],
    ]
    groups = [
        {"title": "1. Bake the LoRA stack into one TriLoRA, look at its spectrum, resize, export as kohya LoRA",
         "members": ["extract", "spectrum", "plot", "summary", "resize", "export", "exported"]},
        {"title": "2. Convert a LoRA file exactly, merge with weights", "members": ["convert", "merge"]},
        {"title": "3. Load with a strength per block", "members": ["blocks", "blocks_info"]},
    ]
    return {"nodes": nodes, "links": links, "groups": groups}


# The files users of each family have, as ComfyUI's own examples name them.
SDXL_CHECKPOINT = "sd_xl_base_1.0.safetensors"
FLUX_MODEL, FLUX_CLIP_L, FLUX_T5, FLUX_VAE = ("flux1-dev.safetensors", "clip_l.safetensors", "t5xxl_fp16.safetensors",
                                              "ae.safetensors")
SDXL_PREFIX, FLUX_PREFIX = "trilora_sdxl_style", "trilora_flux_style"

SDXL_NOTE = f"""TRAIN AND USE AN SDXL STYLE WITH TRILORA (comfyui-trilora)

Row 1: training images + captions -> VAE Encode / CLIP Text Encode -> Train TriLoRA -> Save TriLoRA and the loss graph. Row 2: a picture with the trained TriLoRA applied.

What to change:
- Load Checkpoint: your SDXL model ({SDXL_CHECKPOINT} is the usual file; SDXL finetunes and v-prediction models work the same).
- Load Training Images: an empty folder means the 8 sample pictures that ship with the pack (captions start with "trlstyle"). For your own style, a folder of images with .txt captions of the same name. size: 1024 for SDXL.
- Train TriLoRA: steps, rank and learning_rate. Each image gets SDXL's size conditioning for its own size and the caption's pooled output. timestep_sampling auto = uniform for SDXL, as kohya trains it.
- Save TriLoRA writes {SDXL_PREFIX}_00001_.safetensors into models/loras (the counter grows with each run); load it later with Load TriLoRA.
- Row 2: the prompt (trigger word "trlstyle"), the Apply TriLoRA strength, the sampler.
"""

FLUX_NOTE = f"""TRAIN AND USE A FLUX STYLE WITH TRILORA (comfyui-trilora)

Row 1: training images + captions -> VAE Encode / CLIP Text Encode -> Train TriLoRA -> Save TriLoRA and the loss graph. Row 2: a picture with the trained TriLoRA applied.

What to change:
- Load Diffusion Model: Flux dev ({FLUX_MODEL}, in models/diffusion_models). Load CLIP: {FLUX_CLIP_L} and {FLUX_T5} (or t5xxl_fp8_e4m3fn.safetensors) in models/text_encoders, type flux. Load VAE: {FLUX_VAE}.
- Load Training Images: an empty folder means the 8 sample pictures of the pack (captions start with "trlstyle"); or a folder of images with .txt captions. size: 512 trains fast; 1024 learns finer detail.
- Train TriLoRA: steps, rank, learning_rate. timestep_sampling auto = logit-normal through Flux's own shift (kohya's recommended 'shift' sampling); guidance 1.0 is what kohya and ai-toolkit train Flux dev with. bf16 on a GPU; gradient checkpointing stays on for Flux.
- Save TriLoRA writes {FLUX_PREFIX}_00001_.safetensors into models/loras; load it later with Load TriLoRA.
- Row 2: the prompt (trigger word "trlstyle"), FluxGuidance (3.5 is Flux dev's usual), the Apply TriLoRA strength. Flux runs at cfg 1, so the negative is zeroed.
"""


def family_training_spec(family: str) -> dict:
    """Train a TriLoRA on the sample pictures and generate with it, for SDXL or Flux dev."""
    flux = family == "flux"
    note, prefix, size = (FLUX_NOTE, FLUX_PREFIX, 512) if flux else (SDXL_NOTE, SDXL_PREFIX, 1024)
    if flux:
        loaders = [
            {"key": "unet", "type": "UNETLoader", "pos": [560, 60], "size": [320, 0],
             "widgets": {"unet_name": FLUX_MODEL, "weight_dtype": "default"}},
            {"key": "clip", "type": "DualCLIPLoader", "pos": [560, 180], "size": [320, 0],
             "widgets": {"clip_name1": FLUX_CLIP_L, "clip_name2": FLUX_T5, "type": "flux"}},
            {"key": "vae", "type": "VAELoader", "pos": [560, 340], "size": [320, 0], "widgets": {"vae_name": FLUX_VAE}},
        ]
        model, clip, vae = ("unet", "MODEL"), ("clip", "CLIP"), ("vae", "VAE")
    else:
        loaders = [{"key": "ckpt", "type": "CheckpointLoaderSimple", "pos": [560, 60], "size": [320, 0],
                    "widgets": {"ckpt_name": SDXL_CHECKPOINT}}]
        model, clip, vae = ("ckpt", "MODEL"), ("ckpt", "CLIP"), ("ckpt", "VAE")
    nodes = [
        {"key": "note", "type": "Note", "title": f"Read me: train and use a {'Flux' if flux else 'SDXL'} style",
         "pos": [20, 20], "size": [500, 560], "color": NOTE_COLOR, "widgets": {"text": note}},
        *loaders,
        {"key": "images", "type": "TriLoRASampleImages", "pos": [560, 460], "size": [320, 0],
         "widgets": {"folder": "", "size": size}},
        {"key": "encode", "type": "VAEEncode", "pos": [920, 60]},
        {"key": "captions", "type": "CLIPTextEncode", "title": "Encode captions", "pos": [920, 180],
         "size": [220, 60]},
        {"key": "train", "type": "TrainTriLoRA", "pos": [1180, 60], "size": [420, 0],
         "widgets": {"steps": 300, "rank": 8, "learning_rate": 0.001, "seed": 0, "control_after_generate": "fixed",
                     "alpha": 8.0, "batch_size": 1, "training_dtype": "bf16", "gradient_checkpointing": True}},
        {"key": "save", "type": "SaveTriLoRA", "pos": [1660, 60], "size": [380, 0],
         "widgets": {"filename_prefix": prefix}},
        {"key": "loss", "type": "LossGraphNode", "pos": [1660, 210], "size": [380, 330],
         "widgets": {"filename_prefix": f"{prefix}_loss"}},
        {"key": "pos", "type": "CLIPTextEncode", "title": "Prompt", "pos": [20, 1010], "size": [420, 150],
         "widgets": {"text": STYLE_PROMPT}},
        {"key": "apply", "type": "ApplyTriLoRA", "pos": [500, 1010], "size": [300, 0], "widgets": {"strength": 1.0}},
        {"key": "sampler", "type": "KSampler", "pos": [860, 1010], "size": [300, 0],
         "widgets": {"seed": 42, "control_after_generate": "fixed", "steps": 20 if flux else 25,
                     "cfg": 1.0 if flux else 7.0, "sampler_name": "euler", "scheduler": "simple" if flux else "normal",
                     "denoise": 1.0}},
        {"key": "decode", "type": "VAEDecode", "pos": [1200, 1010]},
        {"key": "image", "type": "SaveImage", "pos": [1420, 1010], "size": [420, 460],
         "widgets": {"filename_prefix": f"trilora/{family}"}},
    ]
    links = [
        ["images", "images", "encode", "pixels"], [*vae, "encode", "vae"],
        ["images", "captions", "captions", "text"], [*clip, "captions", "clip"],
        [*model, "train", "model"], ["encode", "LATENT", "train", "latents"],
        ["captions", "CONDITIONING", "train", "positive"],
        ["train", "TRILORA", "save", "trilora"], ["train", "LOSS_MAP", "loss", "loss"],
        [*clip, "pos", "clip"], [*model, "apply", "model"], ["train", "TRILORA", "apply", "trilora"],
        ["apply", "MODEL", "sampler", "model"], ["sampler", "LATENT", "decode", "samples"],
        [*vae, "decode", "vae"], ["decode", "IMAGE", "image", "images"],
    ]
    if flux:
        nodes += [
            {"key": "guidance", "type": "FluxGuidance", "pos": [20, 1210], "size": [420, 0],
             "widgets": {"guidance": 3.5}},
            {"key": "neg", "type": "ConditioningZeroOut", "pos": [20, 1310], "size": [420, 0]},
            {"key": "latent", "type": "EmptySD3LatentImage", "pos": [20, 1390], "size": [420, 0],
             "widgets": {"width": 1024, "height": 1024, "batch_size": 1}},
        ]
        links += [["pos", "CONDITIONING", "guidance", "conditioning"], ["guidance", "CONDITIONING", "sampler", "positive"],
                  ["pos", "CONDITIONING", "neg", "conditioning"], ["neg", "CONDITIONING", "sampler", "negative"],
                  ["latent", "LATENT", "sampler", "latent_image"]]
    else:
        nodes += [
            {"key": "neg", "type": "CLIPTextEncode", "title": "Negative prompt", "pos": [20, 1210], "size": [420, 90],
             "widgets": {"text": NEGATIVE}},
            {"key": "latent", "type": "EmptyLatentImage", "pos": [20, 1350], "size": [420, 0],
             "widgets": {"width": 1024, "height": 1024, "batch_size": 1}},
        ]
        links += [["pos", "CONDITIONING", "sampler", "positive"], [*clip, "neg", "clip"],
                  ["neg", "CONDITIONING", "sampler", "negative"], ["latent", "LATENT", "sampler", "latent_image"]]
    groups = [
        {"title": "1. Train on images and captions, save, loss graph",
         "members": [n["key"] for n in loaders] + ["images", "encode", "captions", "train", "save", "loss"]},
        {"title": "2. Generate with the trained TriLoRA",
         "members": [n["key"] for n in nodes if n["key"] in ("pos", "neg", "guidance", "latent", "apply", "sampler",
                                                              "decode", "image")]},
    ]
    return {"nodes": nodes, "links": links, "groups": groups}


def workflow_id(name: str) -> str:
    """A fixed id per workflow (the frontend gives each saved workflow a UUID)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, PACK_URL + name))


WORKFLOW_SPECS = {
    "trilora_generate": generation_spec,
    "trilora_train_style": training_spec,
    "trilora_tools": tools_spec,
    "trilora_sdxl_train_and_generate": lambda: family_training_spec("sdxl"),
    "trilora_flux_train_and_generate": lambda: family_training_spec("flux"),
}
