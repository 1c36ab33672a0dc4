"""Data-parallel TrainTriLoRA on torch.distributed (one process per device, started by torchrun),
as PyTorch's DistributedDataParallel trains a model, for the command-line trainer (train_cli.py).

Every rank holds the same factors and optimizer (seeded alike, factors broadcast from rank 0 at
the start) and draws the same global batch from the trainer's seeded sampler and noise; each
runs the forward and backward of its share of the batch's images. Once per step ONE all-reduce
sums the share-weighted gradients and losses of all ranks, so every rank makes the update that
one process makes with the whole batch, together with every rank's status. A rank that fails
(a loss that is not finite, out of memory, any error, a stop signal) sends its failure in the
next all-reduce instead, so all ranks learn of it at the same point and end as the trainer ends
alone: rank 0 saves the last good adapter once and reports, the other ranks stop quietly. A rank
that dies without a word breaks the collective (gloo and NCCL raise), and torchrun sends SIGTERM
to the others: both of those end the same way.

Alone (no process group) it is the plain trainer plus the stop signals: the same program.
"""
from __future__ import annotations

import signal
import time

import torch
import torch.distributed as dist

from .failures import TrainingDivergedError, TrainingOutOfMemoryError, is_out_of_memory
from .parallel import OneProcess

OK, DIVERGED, OUT_OF_MEMORY, FAILED = range(4)


class StopRequested(BaseException):
    """SIGTERM or SIGINT (torchrun forwards both): a BaseException, so that no `except Exception`
    on the way swallows it, as with KeyboardInterrupt."""


class RankFailedError(RuntimeError):
    """Training stopped on another rank, by a stop signal, or by an error outside the trainer's own
    endings (divergence, out of memory). The message says where and what was saved."""


class RanksLostError(RuntimeError):
    """A collective failed: another rank's process is gone (killed, crashed) or unreachable."""


class _Stop:
    """Turns SIGTERM/SIGINT into StopRequested, except while an ending already saves and stops."""

    def __init__(self):
        self.ending = False
        self.requested = False

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.ending or self.requested:
            return
        self.requested = True
        raise StopRequested(signal.Signals(signum).name)


STOP = _Stop()


def world() -> tuple[int, int]:
    """(rank, number of ranks); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


class DataParallel(OneProcess):
    """How one rank of a torch.distributed group shares a run (parallel.py's hooks).
    ``args.batch_size`` is the global batch (per-rank batch x ranks): the one-process run with that
    batch is the same run."""

    def __init__(self):
        self.rank, self.world_size = world()
        self.writes_files = self.rank == 0
        self.told = False  # this run's failure went through an all-reduce
        self.step_ends: list[tuple[float, float]] = []  # (wall, this process's CPU) time after each step
        self.run = None

    def start(self, run) -> None:
        self.run = run
        self.comm_device = run.device if dist.is_initialized() and dist.get_backend() == "nccl" else torch.device("cpu")
        if self.world_size > 1:  # as DDP does: every rank starts from rank 0's factors
            flat = torch.cat([p.detach().reshape(-1) for p in run.params]).to(self.comm_device)
            dist.broadcast(flat, src=0)
            with torch.no_grad():
                for param, value in zip(run.params, self._split(flat), strict=True):
                    param.copy_(value)
            run.last_good.take(run.start.step)

    def _split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """A flat buffer cut back into tensors shaped like the factors, on their device."""
        params = self.run.params
        chunks = flat.to(self.run.device).split([p.numel() for p in params])
        return [chunk.view_as(p) for chunk, p in zip(chunks, params, strict=True)]

    def share(self, size: int) -> list[int]:
        # Position p of the global batch is rank p * ranks // size's: contiguous, even shares.
        return [p for p in range(size) if p * self.world_size // size == self.rank]

    # ---- the one all-reduce per step

    def _exchange(self, code: int, loss: float = 0.0, message: str = "", with_grads: bool = False):
        """All-reduces [gradients | status per rank | loss per rank] (one layout for every call, so
        a failing rank's report meets the others' next step). Returns (codes, losses, messages);
        the gradients are summed in place when ``with_grads`` and every rank is OK."""
        if self.world_size == 1:
            return [code], [loss], [message]
        params = self.run.params
        grads = [p.grad.detach().reshape(-1) if with_grads and p.grad is not None
                 else torch.zeros(p.numel(), device=p.device, dtype=p.dtype) for p in params]
        status = torch.zeros(2 * self.world_size, dtype=torch.float32)
        status[self.rank], status[self.world_size + self.rank] = code, loss
        flat = torch.cat([*grads, status.to(grads[0].device)]).to(self.comm_device)
        try:
            dist.all_reduce(flat)
        except RuntimeError as err:
            STOP.ending = True
            raise RanksLostError(_first_line(err)) from err
        status = flat[-2 * self.world_size:].cpu().tolist()
        codes, losses = [int(c) for c in status[: self.world_size]], status[self.world_size:]
        messages = [""] * self.world_size
        if any(codes):
            # From here every rank ends: torchrun's SIGTERM, once a rank has left, changes nothing.
            STOP.ending = self.told = True
            try:  # only now, when every rank knows that this exchange carries a failure
                dist.all_gather_object(messages, message)
            except RuntimeError:
                messages = [""] * self.world_size
        elif with_grads:
            for param, grad in zip(params, self._split(flat[: -2 * self.world_size]), strict=True):
                param.grad = grad
        return codes, losses, messages

    def all_reduce(self, loss: float) -> float:
        codes, losses, messages = self._exchange(OK, loss, with_grads=True)
        self._raise_for_peers(codes, messages)
        return float(sum(losses))

    def _raise_for_peers(self, codes, messages) -> None:
        """Ends this rank the way the failed rank ended: the trainer's own endings for a loss that is
        not finite or out of memory (rank 0 saves there), RankFailedError for anything else."""
        for peer, code in enumerate(codes):
            if code == DIVERGED:
                self.run.failures.diverged(self.run.step + 1, f"the loss on rank {peer} is not finite")
            if code == OUT_OF_MEMORY:
                raise torch.OutOfMemoryError(f"on rank {peer}: {messages[peer] or 'out of memory'}")
            if code == FAILED:
                raise RankFailedError(f"rank {peer} stopped: {messages[peer] or 'no message'}")

    # ---- the loop and its endings

    def step_done(self, step: int) -> None:
        self.step_ends.append((time.perf_counter(), time.process_time()))

    def finish(self) -> None:
        codes, _, messages = self._exchange(OK)  # every rank finished: only then is the file written
        self._raise_for_peers(codes, messages)

    def failed(self, err: BaseException):
        STOP.ending = True
        run = self.run
        if not self.told and not isinstance(err, RanksLostError):
            code = (DIVERGED if isinstance(err, TrainingDivergedError)
                    else OUT_OF_MEMORY if is_out_of_memory(err) else FAILED)
            said = f"out of memory on {run.device}" if code == OUT_OF_MEMORY else _first_line(err)
            try:
                self._exchange(code, message=said)
            except RanksLostError:
                pass
        err.reported_to_rank0 = self.told and self.rank != 0
        if isinstance(err, (TrainingDivergedError, TrainingOutOfMemoryError)):
            raise err  # the trainer's own ending: rank 0 saved the last good adapter there
        if isinstance(err, StopRequested):
            what = f"stopped by {err}" + (" (torchrun sends it to every rank once one has failed: see its report)"
                                          if self.world_size > 1 else "")
        elif isinstance(err, RanksLostError):
            what = f"lost another rank ({err}; torchrun's report names it)"
        elif isinstance(err, RankFailedError):
            what = str(err)
        else:
            what = f"stopped by an error: {_first_line(err)}"
        # As after running out of memory: the factors after `done` updates, or the snapshot taken
        # just before an update that may be half done.
        in_update = run.last_good.step == run.done
        message = f"TrainTriLoRA: {what}, at step {run.done + 1} of {run.total}. " + run.failures.keep_last_good(
            run.done, from_snapshot=in_update, with_optimizer=not in_update,
            saved="The adapter after step {step} was saved to {path}; choose it as existing_lora to go on "
                  "from there.")
        failure = RankFailedError(message)
        failure.reported_to_rank0 = err.reported_to_rank0
        raise failure from err

    # ---- files: rank 0 only

    def saving(self) -> None:
        STOP.ending = True  # a stop signal now would only cost the save

    def metadata(self, args) -> dict[str, str]:
        # kohya's names: the batch of one device, and the images per update over all of them.
        return {"ss_batch_size_per_device": str(args.batch_size // self.world_size),
                "ss_total_batch_size": str(args.batch_size * args.grad_accumulation_steps)}
