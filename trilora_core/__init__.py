"""trilora_core: the TriLoRA method in plain torch + safetensors (never imports ComfyUI).

delta W = (alpha / r) * U @ diag(s) @ Vt for each adapted weight; see DESIGN.md.
"""

from __future__ import annotations

from .canonical import canonicalize, is_canonical, spectrum, truncate
from .convert import lora_to_trilora, trilora_to_lora
from .errors import TriLoRAFileError
from .extract import SVD_METHODS, energy_rank, extract_layer, kept_energy
from .fileformat import (
    FORMAT_VERSION,
    MAX_ALPHA,
    TRAINING_ARGS_KEY,
    TriLoRAFile,
    read_adapter_file,
    read_trilora,
    write_trilora,
)
from .keys import prefix_for_weight, prefixes_by_weight, weight_for_prefix
from .layer import TriLoRALayer
from .merge import alias_groups, fold_aliases, merge_files, merge_layers
from .safetensors_io import content_hash, file_content_hash
from .training import SCHEDULES, init_layer, lr_lambda, orthogonality_penalty

__all__ = [
    "FORMAT_VERSION",
    "MAX_ALPHA",
    "SCHEDULES",
    "SVD_METHODS",
    "TRAINING_ARGS_KEY",
    "TriLoRAFile",
    "TriLoRAFileError",
    "TriLoRALayer",
    "alias_groups",
    "canonicalize",
    "content_hash",
    "energy_rank",
    "extract_layer",
    "file_content_hash",
    "fold_aliases",
    "init_layer",
    "is_canonical",
    "kept_energy",
    "lora_to_trilora",
    "lr_lambda",
    "merge_files",
    "merge_layers",
    "orthogonality_penalty",
    "prefix_for_weight",
    "prefixes_by_weight",
    "read_adapter_file",
    "read_trilora",
    "spectrum",
    "trilora_to_lora",
    "truncate",
    "weight_for_prefix",
    "write_trilora",
]
