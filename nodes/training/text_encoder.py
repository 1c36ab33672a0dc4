"""Captions encoded at every step, and the text encoders' adapters (kohya's --text_encoder_lr).

When a run trains the text encoders, or drops or shuffles captions (kohya's caption_dropout_rate,
shuffle_caption, keep_tokens: trilora_core.step_caption), each image's caption is made for the
step from the run's seed and encoded by the connected CLIP (with gradients through the adapters
when they train), and its processed conditioning is built for the image's latent size as
ComfyUI's guider builds it (comfy.samplers.encode_model_conds: SDXL's pooled output and size
conditioning included). The image's entry in ``positive`` is the template: its options (guidance,
areas, hooks ...) are kept, its text embedding and pooled output are the step's.

The adapters go on the CLIP's layers that ComfyUI's CLIP key map knows (comfy.lora.
model_lora_keys_clip), the kind ``target_layers`` chooses, under kohya's names (``lora_te_``;
SDXL ``lora_te1_`` / ``lora_te2_``), attached and removed exactly as the diffusion model's
(targets.py): the CLIP comes back unchanged on every way out. Evaluations and previews use the
conditionings as given (encoded before the run)."""
from __future__ import annotations

import comfy.clip_model
import comfy.lora
import torch

from ...trilora_core import TriLoRALayer, generator, init_layer, layers_by_weight, prefixes_by_weight, step_caption
from .batches import concat_entries
from .config import NODE, TrainArgs
from .family import conds_for_shape
from .targets import Attachment, Target, layer_kind_ok

_EMBEDDING_KEYS = ("cross_attn", "pooled_output")  # what encode_model_conds turns into model inputs
_ENCODERS = ("clip_l.", "clip_g.")  # CLIP-L and CLIP-G (not the T5 of SD3/Flux checkpoints)


def _why(args: TrainArgs) -> str:
    """The setting that makes the run encode captions, for errors."""
    if args.text_encoder_lr > 0:
        return f"text_encoder_lr {args.text_encoder_lr:g}"
    if args.caption_dropout_rate > 0:
        return f"caption_dropout_rate {args.caption_dropout_rate:g}"
    return "shuffle_caption"


def check_captions(args: TrainArgs, clip, captions, num_images: int) -> list[str] | None:
    """The captions, one per image (before any validation split), when the run encodes them;
    None when it does not. Raises ValueError naming the input that is missing or does not fit."""
    if not args.encodes_captions:
        return None
    why = _why(args)
    if clip is None:
        raise ValueError(f"{NODE}: {why} encodes the captions at every step, but clip is not connected; connect the "
                         "CLIP that encoded positive (the checkpoint's)")
    if not hasattr(clip, "cond_stage_model") or not hasattr(clip, "tokenize"):
        raise ValueError(f"{NODE}: clip is not a CLIP (got {type(clip).__name__})")
    if captions is None or (isinstance(captions, list) and not captions):
        raise ValueError(f"{NODE}: {why} encodes the captions at every step, but captions is not connected; connect "
                         "the captions output of Load Training Images (one per image)")
    captions = [captions] if isinstance(captions, str) else list(captions)
    bad = next((n for n, c in enumerate(captions) if not isinstance(c, str)), None)
    if bad is not None:
        raise ValueError(f"{NODE}: captions item {bad + 1} is not a string (got {type(captions[bad]).__name__})")
    if len(captions) != num_images:
        raise ValueError(f"{NODE}: captions has {len(captions)} caption{'s' if len(captions) != 1 else ''} for "
                         f"{num_images} images; give one per image, in the images' order (as Load Training "
                         "Images outputs them)")
    return captions


def find_text_encoder_targets(clip, target_layers: str) -> list[Target]:
    """The Linear layers of the CLIP's CLIP-L / CLIP-G of the chosen kind that ComfyUI's CLIP key
    map knows, under their kohya names, sorted by name (convs: none in a CLIP)."""
    model = clip.cond_stage_model
    by_weight = prefixes_by_weight(comfy.lora.model_lora_keys_clip(model, {}))
    found = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if (name.startswith(_ENCODERS) and isinstance(module, torch.nn.Linear) and isinstance(weight, torch.Tensor)
                and f"{name}.weight" in by_weight and layer_kind_ok(name, module, target_layers)):
            found.append(Target(name, module, by_weight[f"{name}.weight"], tuple(weight.shape)))
    return sorted(found, key=lambda t: t.prefix)


class GivenCaptions:
    """A run that encodes no captions: each image trains with its conditioning as given
    (ForwardBatches), and no text-encoder layer trains. CaptionEncoder's interface."""

    targets: list[Target] = []

    def start(self, base, processed: list, batches, adapters: dict, attachment: Attachment) -> None:
        self.batches = batches

    def groups(self, batch: list[int], share: list[int], step: int, micro: int) -> list[tuple[list[int], list]]:
        return self.batches.groups(batch, share)


class CaptionEncoder(GivenCaptions):
    """The run's captions, encoded at each step through ``clip`` (a clone: patches added to it never
    reach the input), with the text encoders' adapters when ``args.text_encoder_lr`` > 0."""

    def __init__(self, args: TrainArgs, clip, captions: list[str], device):
        self.args, self.clip, self.captions, self.device = args, clip.clone(), captions, device
        self.trains = args.text_encoder_lr > 0
        self.targets: list[Target] = []
        self.base, self.batches, self.processed = None, None, []
        model = self.clip.cond_stage_model
        self.key_map = comfy.lora.model_lora_keys_clip(model, {})
        self.weights = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        if self.trains and torch.device(self.clip.patcher.load_device) != torch.device(device):
            raise ValueError(f"{NODE}: text_encoder_lr trains the text encoder beside the model, but clip runs on "
                             f"{self.clip.patcher.load_device} and the model on {device}; load both on one device")
        if self.trains:
            self.all_targets = {f"{t.name}.weight": t for t in find_text_encoder_targets(self.clip, "all linear")}
            if not self.all_targets:
                raise ValueError(f"{NODE}: text_encoder_lr {args.text_encoder_lr:g} trains the text encoder, but "
                                 "clip has no text-encoder layer ComfyUI's LoRA key map knows (CLIP-L, CLIP-G); "
                                 "set text_encoder_lr to 0 or connect the checkpoint's CLIP")

    def keep(self, held_out: list[int]) -> None:
        """Drops the captions of the images validation_split held out."""
        held = set(held_out)
        self.captions = [c for n, c in enumerate(self.captions) if n not in held]

    def check_fits(self, entries: list, image_conds: list) -> None:
        """Raises ValueError naming clip when its conditioning is not the width of ``positive``'s
        (another model's text encoder: an SD1.5 CLIP on SDXL, a CLIP without CLIP-G)."""
        with torch.no_grad():
            out = self.clip.encode_from_tokens(self.clip.tokenize(""), return_pooled=True, return_dict=True)
        cond, extra = entries[image_conds[0][0]]
        given = (cond.shape[-1], _width(extra.get("pooled_output")))
        got = (out["cond"].shape[-1], _width(out.get("pooled_output")))
        if got[0] != given[0] or (given[1] is not None and got[1] != given[1]):
            raise ValueError(f"{NODE}: clip does not fit this model: it encodes captions {got[0]}-wide (pooled "
                             f"{got[1]}), but positive is {given[0]}-wide (pooled {given[1]}): this model has no such "
                             "text encoder. Connect the CLIP that encoded positive (the checkpoint's)")
        check_pairing(self.clip, self.captions, entries, image_conds)

    def start_layers(self, resumed: dict[str, TriLoRALayer]) -> dict[str, TriLoRALayer]:
        """The text encoders' start layers: a resumed file's (``resumed``: its lora_te layers) where it
        has them, else fresh ones on the layers target_layers chooses, from their own seeded stream
        (so the diffusion model's start is the same with or without them). Raises ValueError naming
        existing_lora when its layers do not fit this CLIP."""
        if not self.trains:
            return {}
        if resumed:
            try:
                found = layers_by_weight(resumed, self.key_map, self.weights)
            except ValueError as err:
                raise ValueError(f"{NODE}: existing_lora {self.args.existing_lora!r}: {err}") from None
            missing = list(found.unknown)
            missing += [w for w in found.layers if w not in self.all_targets]
            if missing:
                raise ValueError(f"{NODE}: existing_lora {self.args.existing_lora!r} has {len(missing)} text-encoder "
                                 f"layers clip does not have (first: {missing[0]}); was it made for another model?")
            self.targets = sorted((self.all_targets[w] for w in found.layers), key=lambda t: t.prefix)
            return {self.all_targets[w].prefix: layer for w, layer in found.layers.items()}
        self.targets = find_text_encoder_targets(self.clip, self.args.target_layers)
        gen = generator(self.args.seed, "init", "text_encoder")
        return {t.prefix: init_layer(t.weight_shape, self.args.rank, gen, alpha=self.args.alpha) for t in self.targets}

    # ---- during the run

    def start(self, base, processed: list, batches, adapters: dict, attachment: Attachment) -> None:
        """Once the guider has run: loads the CLIP and attaches the adapters (``adapters``: the run's,
        by prefix) to its layers, recorded in the run's ``attachment``, whose detach removes them."""
        self.base, self.processed, self.batches = base, processed, batches
        self.clip.load_model()
        if self.trains:
            model = self.clip.cond_stage_model
            attachment.freeze(model)
            attachment.alias_inference_tensors(model)
            for target in self.targets:
                attachment.add_adapter(target.module, adapters[target.prefix])
            # ComfyUI's CLIP layers add their residuals in place (x += ...) after a layer norm kept x
            # for the backward pass: with gradients they train only with recomputed activations.
            attachment.checkpoint(model, [m for m in model.modules() if isinstance(m, comfy.clip_model.CLIPLayer)])

    def step_captions(self, batch: list[int], step: int, micro: int) -> list[str]:
        """The caption of each image of the micro-step's batch (all positions: every data-parallel
        rank draws the same captions)."""
        gen = generator(self.args.seed, "captions", step, micro)
        return [step_caption(self.captions[i], gen, self.args.caption_dropout_rate, self.args.shuffle_caption,
                             self.args.keep_tokens) for i in batch]

    def entry(self, image: int, caption: str) -> dict:
        """The processed cond entry of ``image`` with ``caption`` encoded now (with gradients through
        the adapters when they train), its model inputs made for the image's latent size."""
        with torch.set_grad_enabled(self.trains):
            out = self.clip.encode_from_tokens(self.clip.tokenize(caption), return_pooled=True, return_dict=True)
        template = dict(self.processed[self.batches.image_conds[image][0]])
        template["cross_attn"] = out.pop("cond").to(self.device)
        template.update({k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in out.items()
                         if k == "pooled_output" or k not in template})
        shape = tuple(self.batches.images[image].shape)
        made = conds_for_shape(self.base, [template], shape, self.device, self.args.seed)[0]
        for key in _EMBEDDING_KEYS:  # in model_conds now; each step's differ, which must not stop batching
            made.pop(key, None)
        return made

    def groups(self, batch: list[int], share: list[int], step: int, micro: int) -> list[tuple[list[int], list]]:
        """[(positions in ``batch``, cond entries)] per forward pass of the positions ``share``, as
        ForwardBatches.groups, with each image's caption of this step."""
        captions = self.step_captions(batch, step, micro)
        by_shape: dict[tuple, list[int]] = {}
        for pos in share:
            by_shape.setdefault(tuple(self.batches.images[batch[pos]].shape), []).append(pos)
        groups = []
        for positions in by_shape.values():
            entries = [self.entry(batch[p], captions[p]) for p in positions]
            merged = concat_entries(entries)
            groups.extend([(positions, merged)] if merged is not None else
                          [([p], [e]) for p, e in zip(positions, entries, strict=True)])
        return groups


def check_pairing(clip, captions: list[str], entries: list, image_conds: list) -> None:
    """Raises ValueError when a caption is another image's: its encoding is not its own image's
    positive but is another's (captions out of the images' order, as after ComfyUI's Resolution
    Bucket, which regroups the images by size but has no captions to regroup). Captions that match
    no positive (positive encoded from other text) are taken as given."""
    first = [ic[0] for ic in image_conds]
    with torch.no_grad():
        encoded = [clip.encode_from_tokens(clip.tokenize(c), return_dict=True)["cond"].cpu() for c in captions]
    for i, cond in enumerate(encoded):
        if _same(cond, entries[first[i]][0]):
            continue
        other = next((j for j in range(len(first)) if first[j] != first[i] and _same(cond, entries[first[j]][0])),
                     None)
        if other is not None:
            raise ValueError(f"{NODE}: captions are not in the images' order: caption {i + 1} ({captions[i]!r}) is "
                             f"image {other + 1}'s positive, not image {i + 1}'s. Give one caption per image in the "
                             "order of latents (Resolution Bucket reorders the images and not the captions: connect "
                             "Make Training Dataset's outputs instead; Train TriLoRA buckets them itself)")


def _same(cond: torch.Tensor, given) -> bool:
    given = given.detach().cpu() if isinstance(given, torch.Tensor) else None
    return given is not None and given.shape == cond.shape and torch.allclose(
        cond.float(), given.float(), rtol=1e-3, atol=1e-4)


def _width(pooled) -> int | None:
    return int(pooled.shape[-1]) if isinstance(pooled, torch.Tensor) else None
