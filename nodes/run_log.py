"""A run's log files as the command line writes them while it trains: one JSON object per line
(``log.jsonl``: {"step", "loss"} per step, {"step", "heldout", ..., "drift", ...} per evaluation)
and, when the ``tensorboard`` package is importable, TensorBoard event files in the same folder
(as kohya's --logging_dir): scalars train/loss and eval/<measure>. Previews (a latent) are
decoded by ``decode`` and saved as preview_step<N>.png, named in the JSONL."""
from __future__ import annotations

import json
import logging
import os

log = logging.getLogger("comfyui-trilora")


class RunLog:
    """Call with (step, {name: value}) for each record; ``close`` when the run ends."""

    def __init__(self, folder: str, decode=None):
        os.makedirs(folder, exist_ok=True)
        self.folder, self.decode = folder, decode  # decode: latent -> PIL image
        self.path = os.path.join(folder, "log.jsonl")
        self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (open for the whole run)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional, as for kohya
            self.board = None
        else:
            self.board = SummaryWriter(folder)

    def __call__(self, step: int, values: dict) -> None:
        if "preview" in values:
            if self.decode is None:
                return
            name = f"preview_step{step:06d}.png"
            self.decode(values["preview"]).save(os.path.join(self.folder, name))
            values = {"preview": name}
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()  # a run that dies still leaves its curves
        if self.board is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)):
                    self.board.add_scalar("train/loss" if name == "loss" else f"eval/{name}", value, step)

    def close(self) -> None:
        self.file.close()
        if self.board is not None:
            self.board.close()
        log.info("TriLoRA: the run's log is in %s%s", self.path, " (and TensorBoard event files beside it)"
                 if self.board is not None else "")
