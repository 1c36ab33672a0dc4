"""Parsed adapter files, kept per path, modification time, size, inode and ctime: moving a strength
slider re-runs the loader without re-reading the file, and a file replaced on disk is read again."""
from __future__ import annotations

import os
import threading
from collections import OrderedDict

from ..trilora_core import TriLoRAFile, read_adapter_file

MAX_FILES = 8
_cache: OrderedDict[tuple, TriLoRAFile] = OrderedDict()
_lock = threading.Lock()


def file_signature(path: str) -> tuple:
    """(real path, ...): a replaced file changes it even with the old size and modification time
    (a copy that keeps timestamps): a replacement is a new inode, and its ctime cannot be set."""
    stat = os.stat(path)
    return (os.path.realpath(path), stat.st_mtime_ns, stat.st_size, stat.st_ino, stat.st_ctime_ns)


def load_cached(path: str) -> TriLoRAFile:
    signature = file_signature(path)
    with _lock:
        if signature in _cache:
            _cache.move_to_end(signature)
            return _cache[signature]
    parsed = read_adapter_file(path)
    with _lock:
        for stale in [s for s in _cache if s[0] == signature[0]]:
            del _cache[stale]
        _cache[signature] = parsed
        while len(_cache) > MAX_FILES:
            _cache.popitem(last=False)
    return parsed
