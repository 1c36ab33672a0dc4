"""TrainArgs: the one definition of every TrainTriLoRA setting. Each field carries its widget (type,
range, tooltip) and its rule, so the node's schema (``schema_inputs``), its ``execute`` (``from_inputs``),
the check (``check``), the file's metadata (``asdict``) and the command line (nodes/train_cli.py,
built from the schema) all read one place. Field order is the node's input order: saved workflows
depend on it, so new settings go at the end, optional."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import torch
from comfy_api.latest import io

from ...trilora_core import KEEP_BEST, LOSS_FUNCTIONS, LOSS_WEIGHTINGS, OPTIMIZERS, SCHEDULES, TIMESTEP_SAMPLINGS
from ..loras_folder import NONE_FILE, file_choice, prefix_location
from .family import AUTO, DEFAULT_GUIDANCE

NODE = "TrainTriLoRA"
# None: the model's own dtype (precision.py), as TrainLoraNode's training_dtype "none".
TRAINING_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16, "none": None}
TEXT_ENCODER_SETTINGS = ("text_encoder_lr", "caption_dropout_rate", "shuffle_caption", "keep_tokens")
# The settings the node shows after its clip and captions inputs: the text encoder's, then newer ones.
AFTER_CLIP_SETTINGS = (*TEXT_ENCODER_SETTINGS, "offloading", "timestep_min_rank")
TARGETS = ("attention", "attention+feedforward", "all linear", "all linear+conv")

# Defaults (see docs/training-defaults.md for why).
DEFAULT_RANK = 8
DEFAULT_ALPHA = 8.0
DEFAULT_LR = 1e-3
DEFAULT_S_LR_SCALE = 0.1
DEFAULT_TARGET = "attention"
DEFAULT_CHECKPOINT_PREFIX = "trilora/checkpoints/trilora"

Rule = Callable[[str, object], "str | None"]  # (input name, value) -> what is wrong, or None


def at_least(lowest: int) -> Rule:
    return lambda name, v: None if v >= lowest else f"{name} must be at least {lowest}, got {v}"


def zero_is_off(name: str, v) -> str | None:
    return None if v >= 0 else f"{name} must be 0 (off) or more, got {v}"


def not_negative(name: str, v) -> str | None:
    return None if v >= 0 else f"{name} must not be negative, got {v}"


def positive(name: str, v) -> str | None:
    return None if math.isfinite(v) and v > 0 else f"{name} must be a positive number, got {v}"


def zero_or_more(name: str, v) -> str | None:
    return None if math.isfinite(v) and v >= 0 else f"{name} must be 0 or more, got {v}"


def fraction_below_one(name: str, v) -> str | None:
    return None if math.isfinite(v) and 0 <= v < 1 else f"{name} must be at least 0 and below 1, got {v}"


def fraction_up_to_one(name: str, v) -> str | None:
    return None if math.isfinite(v) and 0 <= v <= 1 else f"{name} must be between 0 and 1, got {v}"


def one_of(choices) -> Rule:
    return lambda name, v: None if v in choices else f"{name} must be one of {', '.join(choices)}, got {v!r}"


def in_loras_folder(name: str, v) -> None:
    prefix_location(v, NODE, name)  # raises ValueError naming the input


@dataclass(frozen=True)
class Widget:
    """How one setting shows in ComfyUI: its io type (or "file" for a loras folder choice), its
    options (min, max, step, options), tooltip, whether it is optional, and its rule."""

    kind: object
    tooltip: str
    options: dict
    rule: Rule | None
    optional: bool

    def build(self, name: str, default):
        if self.kind == "file":
            return file_choice(name, self.tooltip, none=True, optional=self.optional)
        extra = {"optional": True} if self.optional else {}
        return self.kind.Input(id=name, default=default, **self.options, **extra, tooltip=self.tooltip)


def setting(default, kind, tooltip: str, rule: Rule | None = None, optional: bool = True, **options):
    return field(default=default, metadata={"widget": Widget(kind, tooltip, options, rule, optional)})


def required(default, kind, tooltip: str, rule: Rule | None = None, **options):
    return setting(default, kind, tooltip, rule, optional=False, **options)


def _choices(default, choices, tooltip: str, optional: bool = True):
    return setting(default, io.Combo, tooltip, one_of(choices), optional, options=list(choices))


@dataclass
class TrainArgs:
    """The run's arguments, as stored in the file's metadata (``trilora_training_args``)."""

    steps: int = required(100, io.Int, "Optimizer steps to train (each sees batch_size x grad_accumulation_steps "
                          "images).", at_least(1), min=1, max=1_000_000)
    rank: int = required(DEFAULT_RANK, io.Int, "Rank r of each adapted layer (number of singular directions). "
                         "Ignored when resuming: the file's rank is kept.", at_least(1), min=1, max=512)
    learning_rate: float = required(DEFAULT_LR, io.Float, "Learning rate of U and V, as for a LoRA. s gets its "
                                    "own, larger one (see s_learning_rate_scale).", positive, min=1e-7, max=10.0,
                                    step=1e-6)
    seed: int = required(0, io.Int, "Decides everything random: initial factors, image order, noise and noise "
                         "levels. The same seed gives the same TriLoRA.", min=0, max=0xFFFFFFFFFFFFFFFF)
    alpha: float = required(DEFAULT_ALPHA, io.Float, "The update is scaled by alpha / rank, as for a LoRA (and "
                            "kept in the file).", positive, min=0.001, max=4096.0, step=0.5)
    batch_size: int = required(1, io.Int, "Images per forward pass.", at_least(1), min=1, max=10000)
    training_dtype: str = _choices("bf16", TRAINING_DTYPES, "Precision of the model's forward and backward "
                                   "(autocast); the adapter itself trains in fp32. fp16 uses loss scaling. Use "
                                   "fp32 on a CPU. none: the model's own dtype, as ComfyUI's Train LoRA means it "
                                   "(its compute dtype kept; fp16 with loss scaling for an fp16 model, else bf16). "
                                   "A float8 base (UNETLoader fp8_e4m3fn) trains in any of them.", optional=False)
    gradient_checkpointing: bool = required(True, io.Boolean, "Recompute activations in the backward pass: much "
                                            "less memory, about a third slower. Always on for Flux, Chroma and "
                                            "HunyuanVideo, whose blocks need it.")
    grad_accumulation_steps: int = setting(1, io.Int, "Forward/backward passes whose gradients are added up per "
                                           "optimizer step.", at_least(1), min=1, max=1024)
    optimizer: str = _choices("AdamW", OPTIMIZERS, "The optimizer (torch defaults; AdamW has weight decay 0.01).")
    lr_schedule: str = _choices("constant", SCHEDULES, "How the learning rate changes over the run (after "
                                "warm-up).")
    warmup_steps: int = setting(0, io.Int, "Steps over which the learning rate rises linearly from 0.",
                                not_negative, min=0, max=1_000_000)
    loss_function: str = _choices("MSE", LOSS_FUNCTIONS, "Loss on the model's own prediction (noise, v or flow), "
                                  "per element.")
    s_learning_rate_scale: float = setting(
        DEFAULT_S_LR_SCALE, io.Float, "How fast s learns: one step changes each weight entry by about "
        "learning_rate x this x alpha / rank (s's own learning rate is learning_rate x this x sqrt(out x in / "
        "rank)). The default 0.1 keeps the base model's other prompts stable (make bench-method); 1 learns "
        "several times faster and drifts more; lower it if training is unstable.",
        positive, min=0.001, max=1000.0, step=0.01)
    orthogonality_penalty: float = setting(0.0, io.Float, "Weight of AdaLoRA's penalty ||U^T U - I|| + ||V V^T - "
                                           "I|| (mean over layers). 0 (off) learns fastest; saved files are made "
                                           "orthonormal anyway.", zero_or_more, min=0.0, max=100.0, step=0.01)
    target_layers: str = _choices(DEFAULT_TARGET, TARGETS, "Which layers of the diffusion model get an adapter. "
                                  "attention includes fused layers that carry attention (a Flux single block's "
                                  "linear1 and linear2). attention (the default) disturbs the base model least; all linear+conv learns "
                                  "fastest. Ignored when resuming.")
    existing_lora: str = setting(NONE_FILE, "file", "Continue training this TriLoRA (or LoRA) file from the loras "
                                 "folder: its layers, step count and, for a checkpoint, optimizer state. [None] "
                                 "starts fresh.")
    checkpoint_every: int = setting(0, io.Int, "Save a checkpoint (with optimizer state, for resuming) every N "
                                    "steps into the loras folder. 0 = off.", zero_is_off, min=0,
                                    max=1_000_000)
    checkpoint_prefix: str = setting(DEFAULT_CHECKPOINT_PREFIX, io.String, "File name for checkpoints inside the "
                                     "loras folder; a counter and the step are added, nothing is replaced.",
                                     in_loras_folder)
    # The family settings (family.py), after all older inputs.
    timestep_sampling: str = _choices(
        AUTO, (AUTO, *TIMESTEP_SAMPLINGS), "Which noise levels training sees. auto: logit_normal for flow models "
        "(Flux, SD3.5, Wan, Qwen-Image, Z-Image, Lumina 2: kohya's 'shift' sampling, mostly mid noise), uniform "
        "for SD1.5/SDXL. Both go through the model's own schedule and shift; put a ModelSamplingSD3/"
        "ModelSamplingFlux node before this one to train at another shift.")
    guidance: float = setting(DEFAULT_GUIDANCE, io.Float, "Distilled guidance for guidance-distilled models (Flux "
                              "dev, HunyuanVideo) during training; 1.0 as kohya and musubi-tuner train Flux. A "
                              "FluxGuidance node on a caption overrides it for that caption. Other models ignore "
                              "it.", zero_or_more, min=0.0, max=100.0, step=0.1)
    # Loss weighting over noise levels (trilora_core/loss_weighting.py), after all older inputs.
    loss_weighting: str = _choices(
        AUTO, (AUTO, *LOSS_WEIGHTINGS), "How much each noise level's error counts. x0: the denoised image's error "
        "(TrainLoraNode's loss), most weight on the noisiest levels, where composition is set; without it the "
        "noisy steps got worse than the untrained model's (make bench-method). none: the plain loss on the model's "
        "own prediction (kohya's default). min_snr: min-SNR-gamma weighting (kohya's --min_snr_gamma), less weight "
        "on the least noisy levels. auto: x0 for SD1.5/SDXL (eps and v models), none for flow models.")
    min_snr_gamma: float = setting(5.0, io.Float, "gamma of loss_weighting = min_snr (5 in the paper and kohya's "
                                   "docs); other weightings ignore it.", positive, min=0.1, max=100.0, step=0.1)
    # What the run is measured by (nodes/training/monitor.py), after all older inputs.
    validation_split: float = setting(0.0, io.Float, "Share of the training images held out to measure the "
                                      "held-out error (chosen by the seed; at least one image when above 0). "
                                      "Validation latents can also be connected.", fraction_below_one, min=0.0,
                                      max=0.95, step=0.05)
    validate_every: int = setting(200, io.Int, "Every N steps (and before the first and after the last), score the "
                                  "held-out images and the base drift on fixed noise at fixed noise levels (the "
                                  "same in every run). 0 = off.", zero_is_off, min=0, max=1_000_000)
    keep_best: str = _choices("off", KEEP_BEST, "Output and save the adapter of the evaluated step with the lowest "
                              "held-out error (drift-bounded: among steps whose drift is at most max_drift) "
                              "instead of the last one. Needs held-out images.")
    max_drift: float = setting(0.01, io.Float, "The drift bound of keep_best 'drift-bounded held-out': the mean "
                               "squared change of the model's prediction (noise, v or flow units) for the "
                               "preservation prompts.", zero_or_more, min=0.0, max=100.0, step=0.001)
    early_stop_evaluations: int = setting(0, io.Int, "With keep_best: stop when this many evaluations in a row "
                                          "found no better step. 0 = never.", zero_is_off, min=0, max=10_000)
    preview_every: int = setting(200, io.Int, "Every N steps, sample a preview from fixed noise with a training caption "
                                 "and the adapter at strength 1 (8 Euler steps, cfg 1) and show it on the node "
                                 "(the command line saves it). 0 = off.", zero_is_off, min=0, max=1_000_000)

    # Text-encoder training (nodes/training/text_encoder.py), after all older inputs; on the node they
    # follow its clip and captions inputs (TEXT_ENCODER_SETTINGS).
    text_encoder_lr: float = setting(0.0, io.Float, "Learning rate of the text encoders' adapters (CLIP-L; SDXL: "
                                     "CLIP-L and CLIP-G), trained beside the diffusion model's as kohya's "
                                     "--text_encoder_lr. 0 (off) trains the diffusion model only. Needs clip and "
                                     "captions connected: the captions are encoded again at every step.",
                                     zero_or_more, min=0.0, max=10.0, step=1e-6)
    caption_dropout_rate: float = setting(0.0, io.Float, "Share of the images that train with the empty caption "
                                          "at a step (kohya's caption_dropout_rate). Needs clip and captions "
                                          "connected.", fraction_up_to_one, min=0.0, max=1.0, step=0.05)
    shuffle_caption: bool = setting(False, io.Boolean, "Shuffle each caption's comma-separated tags at every step "
                                    "(kohya's shuffle_caption); keep_tokens tags stay first. Needs clip and "
                                    "captions connected.")
    keep_tokens: int = setting(0, io.Int, "With shuffle_caption: how many tags at the start of each caption stay in "
                               "place (kohya's keep_tokens, e.g. 1 for a trigger word).", not_negative, min=0,
                               max=1000)
    # Where the base weights stay (precision.py), after all older inputs (on the node: last).
    offloading: bool = setting(False, io.Boolean, "Keep the diffusion model's weights in CPU memory and stream "
                               "each layer to the GPU when it runs (ComfyUI's low-VRAM partial load, as its "
                               "Train LoRA's offloading): for a base larger than the card; slower. Gradient "
                               "checkpointing is on while part of the model stays in CPU memory.")
    # T-LoRA's noise-level rank (nodes/training/rank_control.py), after all older inputs (on the node: last).
    timestep_min_rank: int = setting(0, io.Int, "T-LoRA's noise-level-dependent rank: at noise level t (1 the "
                                     "noisiest) only the first floor((1 - t) x (rank - this)) + this directions "
                                     "of s train, so the noisiest levels use the fewest. The file records it and "
                                     "Load TriLoRA / Apply TriLoRA apply the same mask at each sampling step (a "
                                     "stock LoRA loader, after Export TriLoRA as LoRA, uses every direction at "
                                     "every step). 0 = off.", not_negative, min=0, max=512)

    @classmethod
    def schema_inputs(cls, text_encoder: bool = False) -> list:
        """The node's setting inputs, in field order (built when the schema is: file lists are fresh):
        with ``text_encoder`` those it shows after clip and captions (the text-encoder settings, then
        newer ones: AFTER_CLIP_SETTINGS), else all others."""
        return [f.metadata["widget"].build(f.name, f.default) for f in fields(cls)
                if (f.name in AFTER_CLIP_SETTINGS) == text_encoder]

    @property
    def encodes_captions(self) -> bool:
        """Whether the run encodes its captions at every step (text-encoder training, dropout or shuffle)."""
        return self.text_encoder_lr > 0 or self.caption_dropout_rate > 0 or self.shuffle_caption

    @classmethod
    def from_inputs(cls, inputs: dict) -> TrainArgs:
        """From the node's inputs (lists, as ComfyUI hands an is_input_list node, or plain values);
        missing ones take their defaults. Raises TypeError for an input that is no setting."""
        known = {f.name: f for f in fields(cls)}
        extra = sorted(set(inputs) - set(known))
        if extra:
            raise TypeError(f"{NODE}: unexpected inputs {', '.join(extra)}")
        values = {}
        for name, value in inputs.items():
            value = single_input(value)
            convert = _CONVERT.get(known[name].type)
            values[name] = convert(value) if convert else value
        return cls(**values)

    def check(self) -> None:
        """Raises ValueError naming the first setting (in input order) that breaks its rule."""
        for f in fields(self):
            rule = f.metadata["widget"].rule
            problem = rule(f.name, getattr(self, f.name)) if rule else None
            if problem:
                raise ValueError(f"{NODE}: {problem}")


_CONVERT = {"int": int, "float": float, "bool": bool}


def single_input(value):
    """ComfyUI hands an is_input_list node every input as a list; scripts may pass plain values."""
    return value[0] if isinstance(value, list) and value else value
