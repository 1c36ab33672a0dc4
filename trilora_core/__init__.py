"""trilora_core: the TriLoRA method in plain torch + safetensors (never imports ComfyUI).

delta W = (alpha / r) * U @ diag(s) @ Vt for each adapted weight; the file format: docs/file-format.md.
"""

from __future__ import annotations

from .blocks import GROUPS, TEXT_ENCODERS, DepthLayout, block_group, depth_layout
from .buckets import bucket_batch, bucket_resolutions, group_buckets, select_bucket
from .canonical import canonicalize, delta_energy, fix_signs, is_canonical, spectrum, truncate, truncation_limits
from .captions import step_caption
from .checks import MAX_ALPHA
from .convert import lora_to_trilora, trilora_to_lora
from .dataset_cache import read_dataset_cache, tensor_digest, text_digest, write_dataset_cache
from .errors import TriLoRAFileError
from .extract import SVD_METHODS, energy_rank, extract_layer, kept_energy
from .fileformat import (
    FORMAT_VERSION,
    TRAINING_ARGS_KEY,
    TriLoRAFile,
    read_adapter_file,
    read_trilora,
    write_trilora,
)
from .formatting import format_number, rank_range
from .key_map import (
    comfyui_prefixes,
    diffusers_prefixes,
    kohya_prefixes,
    layers_by_weight,
    lookup,
    prefix_for_weight,
    prefixes_by_weight,
    rename_layers,
    split_rows,
    sum_layers,
    target_of,
    weight_for_prefix,
)
from .kohya import KOHYA, PEFT, lora_file_bytes, lora_metadata, lora_tensors, unit_scale, write_lora
from .layer import TriLoRALayer
from .loss_weighting import LOSS_WEIGHTINGS, noise_level_weights
from .merge import alias_groups, fold_aliases, merge_files, merge_layers
from .optimizer import (
    OPTIMIZERS,
    SCHEDULES,
    StaleOptimizerFile,
    load_optimizer_state,
    lr_lambda,
    make_optimizer,
    optimizer_file_path,
    param_groups,
    read_optimizer_file,
    write_optimizer_file,
)
from .safetensors_io import SafetensorsReader, atomic_write_bytes, content_hash, file_content_hash
from .suffixes import TRILORA_PARTS
from .timestep_rank import (
    TIMESTEP_RANK_KEY,
    active_directions,
    band_bounds,
    band_starts,
    banded,
    nested_bands,
    rank_mask,
    read_schedule,
    schedule_metadata,
)
from .timesteps import TIMESTEP_SAMPLINGS, sample_noise_levels
from .training import (
    LOSS_FUNCTIONS,
    all_finite,
    generator,
    init_layer,
    loss_function,
    orthogonality_penalty,
    sample_indices,
)
from .validation import (
    KEEP_BEST,
    VALIDATION_LEVELS,
    BestStep,
    holdout_split,
    prediction_drift,
    prediction_errors,
    validation_levels,
    validation_noise,
    validation_plan,
)

__all__ = [
    "active_directions",
    "band_starts",
    "band_bounds",
    "banded",
    "read_schedule",
    "schedule_metadata",
    "TIMESTEP_RANK_KEY",
    "nested_bands",
    "rank_mask",
    "read_dataset_cache",
    "tensor_digest",
    "text_digest",
    "write_dataset_cache",
    "bucket_batch",
    "bucket_resolutions",
    "group_buckets",
    "select_bucket",
    "KEEP_BEST",
    "VALIDATION_LEVELS",
    "BestStep",
    "holdout_split",
    "prediction_drift",
    "prediction_errors",
    "validation_levels",
    "validation_noise",
    "validation_plan",
    "DepthLayout",
    "FORMAT_VERSION",
    "GROUPS",
    "LOSS_FUNCTIONS",
    "LOSS_WEIGHTINGS",
    "MAX_ALPHA",
    "OPTIMIZERS",
    "SCHEDULES",
    "SVD_METHODS",
    "SafetensorsReader",
    "StaleOptimizerFile",
    "TEXT_ENCODERS",
    "TIMESTEP_SAMPLINGS",
    "TRAINING_ARGS_KEY",
    "TRILORA_PARTS",
    "TriLoRAFile",
    "TriLoRAFileError",
    "TriLoRALayer",
    "alias_groups",
    "all_finite",
    "atomic_write_bytes",
    "block_group",
    "canonicalize",
    "content_hash",
    "delta_energy",
    "depth_layout",
    "energy_rank",
    "extract_layer",
    "file_content_hash",
    "fix_signs",
    "fold_aliases",
    "format_number",
    "generator",
    "init_layer",
    "is_canonical",
    "kept_energy",
    "kohya_prefixes",
    "comfyui_prefixes",
    "diffusers_prefixes",
    "split_rows",
    "KOHYA",
    "PEFT",
    "unit_scale",
    "layers_by_weight",
    "load_optimizer_state",
    "lookup",
    "lora_file_bytes",
    "lora_metadata",
    "lora_tensors",
    "lora_to_trilora",
    "loss_function",
    "lr_lambda",
    "make_optimizer",
    "merge_files",
    "merge_layers",
    "noise_level_weights",
    "optimizer_file_path",
    "orthogonality_penalty",
    "param_groups",
    "prefix_for_weight",
    "prefixes_by_weight",
    "rank_range",
    "read_adapter_file",
    "read_optimizer_file",
    "read_trilora",
    "rename_layers",
    "sample_indices",
    "sample_noise_levels",
    "spectrum",
    "step_caption",
    "sum_layers",
    "target_of",
    "trilora_to_lora",
    "truncate",
    "truncation_limits",
    "weight_for_prefix",
    "write_lora",
    "write_optimizer_file",
    "write_trilora",
]
