"""How a run ends other than by finishing: a loss or gradients that stop being finite
(TrainingDivergedError) and a step that runs out of memory (TrainingOutOfMemoryError). Either
way the last good adapter is saved when the run made one, and the error says where it is and what
to change. Its state is LastGood, the factors of the last step that ended finite; RunFailures
gets what it reads from the run when the trainer makes it."""
from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass, field

import comfy.model_management
import torch

from .config import NODE


class TrainingDivergedError(RuntimeError):
    """The loss or the gradients stopped being finite."""


class TrainingOutOfMemoryError(torch.OutOfMemoryError):
    """A step ran out of memory. An OutOfMemoryError, so ComfyUI's executor also unloads its models."""


def is_out_of_memory(err: BaseException) -> bool:
    if isinstance(err, (MemoryError, torch.OutOfMemoryError)):
        return True
    is_oom = getattr(comfy.model_management, "is_oom", None)  # newer ComfyUI: accelerator OOMs too
    if is_oom is not None and is_oom(err):
        return True
    # torch's CPU allocator reports a failed allocation as a plain RuntimeError
    return isinstance(err, RuntimeError) and "can't allocate memory" in str(err)


@dataclass
class LastGood:
    """A copy of the factors (``params``) taken before each update, once the step's loss and
    gradients were found finite: what a failing run puts back and saves. ``step``: the updates
    done when it was taken."""

    params: list[torch.Tensor]
    step: int
    snapshot: list[torch.Tensor] = field(init=False)

    def __post_init__(self):
        self.snapshot = [p.detach().clone() for p in self.params]

    def take(self, step: int) -> None:
        with torch.no_grad():
            torch._foreach_copy_(self.snapshot, [p.detach() for p in self.params])
        self.step = step

    def restore(self) -> None:
        with torch.no_grad():
            torch._foreach_copy_([p.data for p in self.params], self.snapshot)


@dataclass
class RunFailures:
    """The endings of one run. ``save(steps_done, suffix=..., with_optimizer=...)`` writes a
    checkpoint and returns its path; ``before_save`` runs first (data parallel: no stop signal
    may cut the save); ``first_step`` and ``source``: where the run started (a resumed file)."""

    last_good: LastGood
    optimizer: torch.optim.Optimizer
    save: Callable[..., str]
    learning_rate: float
    dtype: torch.dtype
    device: torch.device
    total: int
    first_step: int
    source: str | None
    memory_hints: Callable[[], str]  # what to change to fit, as the run is set up now
    before_save: Callable[[], None] = lambda: None

    def diverged(self, step: int, what: str):
        hint = "" if self.dtype == torch.float32 else " (or try training_dtype fp32)"
        message = (f"{NODE}: training diverged at step {step} of {self.total}: {what}; "
                   f"learning_rate {self.learning_rate:g} is probably too high{hint}. ")
        message += self.keep_last_good(self.last_good.step, from_snapshot=True, with_optimizer=False,
                                       saved="The last good adapter (after step {step}) was saved to {path}.")
        raise TrainingDivergedError(message)

    def out_of_memory(self, step: int, what: str):
        self.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        comfy.model_management.soft_empty_cache()
        message = (f"{NODE}: out of memory at step {step} of {self.total} on {self.device} ({what}). "
                   f"The memory of the run was released. To fit, {self.memory_hints()}. ")
        # Before the update the factors and the optimizer state are those after step `done`.
        # The snapshot is taken just before the update: once it is, the update may be half done.
        done = step - 1
        in_update = self.last_good.step == done
        message += self.keep_last_good(done, from_snapshot=in_update, with_optimizer=not in_update,
                                       saved="The adapter after step {step} was saved to {path}; choose it as "
                                             "existing_lora to go on from there.")
        self.optimizer.state.clear()
        raise TrainingOutOfMemoryError(message)

    def measuring(self, steps_done: int, call, *args):
        """``call(*args)``, a monitor call (evaluation, preview) after ``steps_done`` steps: out of
        memory there ends the run as in a step, with the adapter after ``steps_done`` steps saved."""
        try:
            return call(*args)
        except Exception as err:
            if not is_out_of_memory(err):
                raise
            what = f"measuring after step {steps_done}: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
        self.out_of_memory(steps_done + 1, what)  # out here: the failed forward's tensors are freed

    def keep_last_good(self, steps_done: int, from_snapshot: bool, with_optimizer: bool, saved: str) -> str:
        """Saves the adapter after ``steps_done`` steps (the factors of the last snapshot where
        ``from_snapshot``) when this run made any; returns what the error message says of it."""
        self.before_save()
        if steps_done > self.first_step:
            if from_snapshot:
                self.last_good.restore()
            path = self.save(steps_done, suffix="last_good", with_optimizer=with_optimizer)
            return saved.format(step=steps_done, path=path)
        if self.source:
            return f"No step succeeded; the adapter you resumed from is unchanged: {self.source}."
        return "No step succeeded, so there is no trained adapter to keep."


def memory_hints(batch: int, checkpointing: bool, dtype: torch.dtype, can_offload: bool = False) -> str:
    """What to change to fit in memory, most effective first, as the error message says it.
    ``can_offload``: offloading is off and the run is on a GPU, where it would keep the weights out."""
    hints = []
    if batch > 1:
        hints.append("lower batch_size (raise grad_accumulation_steps to keep the effective batch)")
    if not checkpointing:
        hints.append("turn gradient_checkpointing on")
    if dtype == torch.float32:
        hints.append("train in bf16")
    if can_offload:
        hints.append("turn offloading on (the base weights stay in CPU memory)")
    hints.append("use smaller latents or a lower rank")
    return ", ".join(hints[:-1]) + (" or " if len(hints) > 1 else "") + hints[-1]
