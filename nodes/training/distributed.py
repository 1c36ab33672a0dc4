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

from .endings import TrainingDivergedError, TrainingOutOfMemoryError, is_out_of_memory
from .trainer import TriLoRATrainer

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


class DataParallelTrainer(TriLoRATrainer):
    """TriLoRATrainer for one rank of a torch.distributed group. ``args.batch_size`` is the global
    batch (per-rank batch x ranks): the one-process run with that batch is the same run."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rank, self.world_size = world()
        self.comm_device = self.device if dist.is_initialized() and dist.get_backend() == "nccl" else torch.device("cpu")
        self.step = self.done = self.start.step  # the step under way; updates completed
        self.told = False  # this run's failure went through an all-reduce
        self.step_ends: list[tuple[float, float]] = []  # (wall, this process's CPU) time after each step
        if self.world_size > 1:  # as DDP does: every rank starts from rank 0's factors
            flat = torch.cat([p.detach().reshape(-1) for p in self.params]).to(self.comm_device)
            dist.broadcast(flat, src=0)
            with torch.no_grad():
                for param, value in zip(self.params, self._split(flat), strict=True):
                    param.copy_(value)
                torch._foreach_copy_(self.good, [p.detach() for p in self.params])

    def _split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """A flat buffer cut back into tensors shaped like the factors, on their device."""
        chunks = flat.to(self.device).split([p.numel() for p in self.params])
        return [chunk.view_as(p) for chunk, p in zip(chunks, self.params, strict=True)]

    # ---- this rank's share of each batch

    def _forward_groups(self, batch):
        # Position p of the global batch is rank p * ranks // len(batch)'s: contiguous, even shares.
        mine = [p for p in range(len(batch)) if p * self.world_size // len(batch) == self.rank]
        groups = super()._forward_groups([batch[p] for p in mine])
        return [([mine[q] for q in positions], conds) for positions, conds in groups]

    # ---- the one all-reduce per step

    def _exchange(self, code: int, loss: float = 0.0, message: str = "", with_grads: bool = False):
        """All-reduces [gradients | status per rank | loss per rank] (one layout for every call, so
        a failing rank's report meets the others' next step). Returns (codes, losses, messages);
        the gradients are summed in place when ``with_grads`` and every rank is OK."""
        if self.world_size == 1:
            return [code], [loss], [message]
        grads = [p.grad.detach().reshape(-1) if with_grads and p.grad is not None
                 else torch.zeros(p.numel(), device=p.device, dtype=p.dtype) for p in self.params]
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
            for param, grad in zip(self.params, self._split(flat[: -2 * self.world_size]), strict=True):
                param.grad = grad
        return codes, losses, messages

    def _all_reduce(self, loss: float) -> float:
        codes, losses, messages = self._exchange(OK, loss, with_grads=True)
        self._raise_for_peers(codes, messages)
        return float(sum(losses))

    def _raise_for_peers(self, codes, messages) -> None:
        """Ends this rank the way the failed rank ended: the trainer's own endings for a loss that is
        not finite or out of memory (rank 0 saves there), RankFailedError for anything else."""
        for peer, code in enumerate(codes):
            if code == DIVERGED:
                self._diverged(self.step + 1, f"the loss on rank {peer} is not finite")
            if code == OUT_OF_MEMORY:
                raise torch.OutOfMemoryError(f"on rank {peer}: {messages[peer] or 'out of memory'}")
            if code == FAILED:
                raise RankFailedError(f"rank {peer} stopped: {messages[peer] or 'no message'}")

    # ---- the loop and its endings

    def _step(self, model_wrap, extra_args, step: int) -> float:
        self.step = step
        loss = super()._step(model_wrap, extra_args, step)
        self.done = step + 1
        self.step_ends.append((time.perf_counter(), time.process_time()))
        return loss

    def _loop(self, model_wrap, extra_args) -> None:
        try:
            super()._loop(model_wrap, extra_args)
            codes, _, messages = self._exchange(OK)  # every rank finished: only then is the file written
            self._raise_for_peers(codes, messages)
        except BaseException as err:
            self._end(err)

    def _end(self, err: BaseException):
        STOP.ending = True
        if not self.told and not isinstance(err, RanksLostError):
            code = (DIVERGED if isinstance(err, TrainingDivergedError)
                    else OUT_OF_MEMORY if is_out_of_memory(err) else FAILED)
            said = f"out of memory on {self.device}" if code == OUT_OF_MEMORY else _first_line(err)
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
        in_update = self.good_step == self.done
        message = f"TrainTriLoRA: {what}, at step {self.done + 1} of {self.total}. " + self._keep_last_good(
            self.done, from_snapshot=in_update, with_optimizer=not in_update,
            saved="The adapter after step {step} was saved to {path}; choose it as existing_lora to go on "
                  "from there.")
        failure = RankFailedError(message)
        failure.reported_to_rank0 = err.reported_to_rank0
        raise failure from err

    # ---- files: rank 0 only

    def _keep_last_good(self, *args, **kwargs) -> str:
        STOP.ending = True  # a stop signal now would only cost the save
        return super()._keep_last_good(*args, **kwargs)

    def write_checkpoint(self, steps_done: int, suffix: str = "", with_optimizer: bool = True) -> str:
        if self.rank != 0:
            return "(rank 0's folder)"
        return super().write_checkpoint(steps_done, suffix, with_optimizer)

    def metadata(self, steps_done: int) -> dict[str, str]:
        meta = super().metadata(steps_done)
        # kohya's names: the batch of one device, and the images per update over all of them.
        meta["ss_batch_size_per_device"] = str(self.args.batch_size // self.world_size)
        meta["ss_total_batch_size"] = str(self.args.batch_size * self.args.grad_accumulation_steps)
        return meta
