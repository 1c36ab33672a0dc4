"""TrainTriLoRA's machinery, apart from the node (nodes/train.py): the settings (config), the data
(batches), the adapted layers and their hooks (targets), the run (trainer), how it ends early
(failures), and its checkpoints and resume (checkpoints). docs/architecture.md shows the phases."""
from __future__ import annotations

from .batches import split_conditioning, split_latents
from .checkpoints import read_start, resume_start
from .config import TRAINING_DTYPES, TrainArgs, single_input
from .failures import TrainingDivergedError, TrainingOutOfMemoryError, is_out_of_memory
from .targets import Target, find_targets, trainable_alias
from .trainer import TriLoRATrainer, train

__all__ = [
    "TRAINING_DTYPES",
    "Target",
    "TrainArgs",
    "TrainingDivergedError",
    "TrainingOutOfMemoryError",
    "TriLoRATrainer",
    "find_targets",
    "is_out_of_memory",
    "single_input",
    "read_start",
    "resume_start",
    "split_conditioning",
    "split_latents",
    "trainable_alias",
    "train",
]
