"""The one error type raised for any problem with an adapter file."""

from __future__ import annotations

import os


class TriLoRAFileError(ValueError):
    """A file that cannot be read or written as a TriLoRA (or LoRA) adapter.

    ``str(error)`` is ``"{path}: {key}: {reason}"``, or ``"{path}: {reason}"`` when the
    problem is not tied to one tensor, so users see which file and which tensor is at fault.
    """

    def __init__(self, path: str | os.PathLike[str], key: str | None, reason: str) -> None:
        self.path = os.fspath(path)
        self.key = key
        self.reason = reason
        super().__init__(f"{self.path}: {key}: {reason}" if key else f"{self.path}: {reason}")

    def __reduce__(self):  # keep pickling working despite the custom __init__ (multiprocessing)
        return (type(self), (self.path, self.key, self.reason))
