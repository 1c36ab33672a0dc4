"""How a run shares its work between processes: the collaborator TriLoRATrainer calls at fixed
points of its loop. OneProcess is a run alone (the node, and the command line without torchrun);
DataParallel (distributed.py) is one of several torch.distributed processes."""
from __future__ import annotations


class OneProcess:
    """A run in one process: every hook leaves the run as it is."""

    rank = 0
    world_size = 1
    writes_files = True  # checkpoints and the last good adapter are written by this process

    def start(self, run) -> None:
        """Once the trainer has its factors, before the first step (``run``: the TriLoRATrainer)."""

    def share(self, size: int) -> list[int]:
        """The positions of a step's batch of ``size`` images this process runs forward and backward."""
        return list(range(size))

    def all_reduce(self, loss: float) -> float:
        """After a step's backward passes, before the update: the loss (and the factors' gradients)
        summed over the processes. May end the run the way another process failed."""
        return loss

    def step_done(self, step: int) -> None:
        """After the update of ``step`` (updates done before it)."""

    def finish(self) -> None:
        """After the last step, before the result is saved: every process got there."""

    def failed(self, err: BaseException):
        """The run raised ``err`` (an ending, an error, a cancel): raises what the run ends with."""
        raise err

    def saving(self) -> None:
        """Just before a failing run saves its last good adapter."""

    def metadata(self, args) -> dict[str, str]:
        """Entries of the saved file's metadata that depend on how the run was shared."""
        return {}
