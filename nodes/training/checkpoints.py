"""Where a run starts and what it writes: fresh factors or a resumed file in any naming ComfyUI's
key map knows (with the optimizer state of its side-file when that still fits), the run's metadata,
and checkpoints (the adapter file plus the optimizer side-file, trilora_core.optimizer)."""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field

import comfy.lora
import folder_paths

from ...trilora_core import (
    TEXT_ENCODERS,
    TRAINING_ARGS_KEY,
    StaleOptimizerFile,
    TriLoRAFile,
    TriLoRALayer,
    block_group,
    generator,
    init_layer,
    layers_by_weight,
    optimizer_file_path,
    read_optimizer_file,
    schedule_metadata,
    write_optimizer_file,
)
from ..file_cache import load_cached
from ..loras_folder import NONE_FILE, prefix_location, save_new_file
from .config import NODE, TrainArgs
from .targets import ANY_LAYER, Target, find_targets

log = logging.getLogger("comfyui-trilora")

STEPS_KEY = "trilora_steps"
LOSS_KEY = "trilora_loss_history"


@dataclass
class StartState:
    """Where a run starts: fresh factors or a resumed file (with optimizer state if its side-file fits)."""

    layers: dict[str, TriLoRALayer]
    step: int = 0
    loss_history: list | None = None
    optimizer_tensors: dict | None = None
    source: str | None = None
    held: dict = field(default_factory=dict)  # a resumed file's rank, alpha and targets, for the record
    text_layers: dict = field(default_factory=dict)  # a resumed file's text-encoder layers, by file prefix


def fresh(args: TrainArgs) -> bool:
    return args.existing_lora in (NONE_FILE, "", None)


def read_start(args: TrainArgs, targets: list[Target]) -> StartState:
    if fresh(args):
        gen = generator(args.seed, "init")
        layers = {t.prefix: init_layer(t.weight_shape, args.rank, gen, alpha=args.alpha) for t in targets}
        return StartState(layers)
    path = folder_paths.get_full_path_or_raise("loras", args.existing_lora)
    adapter = load_cached(path)  # under ComfyUI's renames, as the loaders read it
    if adapter.diffs:
        raise ValueError(f"{NODE}: existing_lora {args.existing_lora!r} holds {len(adapter.diffs)} full-weight "
                         f"diffs (first: {sorted(adapter.diffs)[0]}) beside its low-rank layers, as ComfyUI's Train "
                         "LoRA writes them; training continues low-rank layers only, so it would drop them. Apply "
                         "the file with Load TriLoRA (or LoraLoader) and train a new TriLoRA on that model instead")
    meta = adapter.metadata
    step = int(meta.get(STEPS_KEY) or meta.get("ss_steps") or 0)
    try:
        history = json.loads(meta.get(LOSS_KEY, "[]"))
    except ValueError:
        history = []
    state = StartState(dict(adapter.layers), step, history if isinstance(history, list) else [], source=path,
                       held=held_arguments(adapter))
    try:
        found = read_optimizer_file(path, state.layers)
        if found is not None:
            state.layers, state.optimizer_tensors = found
    except StaleOptimizerFile as err:
        log.warning("TriLoRA: %s belongs to another version of %s; optimizer state not restored", err, path)
    except Exception as err:  # a broken side-file only costs the optimizer state
        log.warning("TriLoRA: optimizer state %s not used: %s", optimizer_file_path(path), err)
    return state


def held_arguments(adapter: TriLoRAFile) -> dict:
    """What a resumed file fixes whatever the inputs say: its rank and alpha (the largest rank and
    that layer's alpha, as ss_network_dim / ss_network_alpha) and which layers it adapts (the
    target_layers of its own record, or "existing_lora" for a file without one)."""
    layers = adapter.layers
    rank = max(layer.rank for layer in layers.values())
    alpha = next(layers[p].alpha for p in sorted(layers) if layers[p].rank == rank)
    try:
        targets = json.loads(adapter.metadata.get(TRAINING_ARGS_KEY, "{}")).get("target_layers")
    except (ValueError, AttributeError):
        targets = None
    return {"rank": rank, "alpha": alpha, "target_layers": targets if isinstance(targets, str) else "existing_lora"}


def resume_start(args: TrainArgs, model_patcher, keep_text_encoders: bool = False) -> tuple[list[Target], StartState]:
    """(targets, start) from existing_lora in any naming ComfyUI's key map knows: each layer is
    resolved to the weight it adapts (aliases and slices folded exactly, trilora_core.key_map) and
    trained under the pack's name for that weight. The file's text-encoder layers go to
    ``start.text_layers`` when ``keep_text_encoders`` (text_encoder.py resolves them against the
    CLIP). Raises ValueError naming what does not fit."""
    name = f"{NODE}: existing_lora {args.existing_lora!r}"
    everything = {f"{t.name}.weight": t for t in find_targets(model_patcher, ANY_LAYER)}
    start = read_start(args, [])
    key_map = comfy.lora.model_lora_keys_unet(model_patcher.model, {})
    try:
        resolved = layers_by_weight(start.layers, key_map, {k: t.weight_shape for k, t in everything.items()})
    except ValueError as err:
        raise ValueError(f"{name}: {err}; was it made for another base model?") from None
    te = [p for p in resolved.unknown if block_group(p) in TEXT_ENCODERS]
    if te and not keep_text_encoders:
        raise ValueError(f"{name} holds {len(te)} text-encoder layers (first: {te[0]}); with text_encoder_lr 0 "
                         f"{NODE} trains the diffusion model only, so it would drop them. Set text_encoder_lr above "
                         "0 and connect clip and captions to continue them, or resume from a file without them")
    start.text_layers = {p: start.layers[p] for p in te}
    resolved.unknown = [p for p in resolved.unknown if p not in start.text_layers]
    if resolved.unknown:
        raise ValueError(f"{name} has {len(resolved.unknown)} layers this model does not have (first: "
                         f"{resolved.unknown[0]}); was it made for another base model?")
    targets = sorted((everything[w] for w in resolved.layers), key=lambda t: t.prefix)
    start.layers = {everything[w].prefix: layer for w, layer in resolved.layers.items()}
    return targets, start


def run_metadata(args: TrainArgs, start: StartState, losses: list[float], num_images: int, base_meta: dict,
                 steps_done: int) -> dict[str, str]:
    """The file's metadata after ``steps_done`` steps: the arguments (JSON), step count, loss
    history, kohya's ss_* training fields, and the base model's metadata."""
    history = list(start.loss_history or []) + [float(f"{v:.6g}") for v in losses[: steps_done - start.step]]
    record = {**asdict(args), **start.held}
    record.update(num_images=num_images, resumed_from_step=start.step, total_steps=steps_done)
    meta = {
        TRAINING_ARGS_KEY: json.dumps(record, sort_keys=True),
        STEPS_KEY: str(steps_done),
        LOSS_KEY: json.dumps(history),
        "ss_steps": str(steps_done),
        "ss_seed": str(args.seed),
        "ss_learning_rate": repr(float(args.learning_rate)),
        "ss_num_train_images": str(num_images),
        "ss_optimizer": args.optimizer,
    }
    if args.encodes_captions:  # kohya's names for them
        meta.update(ss_text_encoder_lr=repr(float(args.text_encoder_lr)),
                    ss_caption_dropout_rate=repr(float(args.caption_dropout_rate)),
                    ss_shuffle_caption=str(args.shuffle_caption), ss_keep_tokens=str(args.keep_tokens))
    meta.update(base_meta)
    meta.update(schedule_metadata(args.timestep_min_rank))  # T-LoRA's schedule, for the loaders' mask
    return meta


def write_checkpoint(args: TrainArgs, adapter: TriLoRAFile, steps_done: int, suffix: str = "",
                     optimizer=None) -> str:
    """Writes ``adapter`` as a new file named by checkpoint_prefix and the step, with the
    optimizer's side-file when ``optimizer`` is given; returns the file's path."""
    folder, base = prefix_location(args.checkpoint_prefix, NODE, "checkpoint_prefix")
    path = save_new_file(adapter, folder, base, f"step{steps_done:06d}{'_' + suffix if suffix else ''}")
    if optimizer is not None:
        write_optimizer_file(path, optimizer, args.optimizer)
    log.info("TriLoRA checkpoint (step %d) written to %s", steps_done, path)
    return path
