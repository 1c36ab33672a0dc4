"""How numbers and ranks are written in file metadata and messages, so each reads the same everywhere."""

from __future__ import annotations

from collections.abc import Iterable


def format_number(value: float) -> str:
    """``8`` for a whole number, else Python's shortest round-trip repr (``0.5``, ``1e-07``)."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def rank_range(ranks: Iterable[int]) -> str:
    """``4`` when every rank is 4, else ``lowest-highest`` (``2-8``). Raises ValueError when empty."""
    ranks = list(ranks)
    lo, hi = min(ranks), max(ranks)
    return str(lo) if lo == hi else f"{lo}-{hi}"
