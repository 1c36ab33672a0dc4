"""Parsed adapter files, kept per path, modification time, size, inode and ctime: moving a strength
slider re-runs the loader without re-reading the file, and a file replaced on disk is read again.
Files are read under the names ComfyUI's LoraLoader matches them by (its comfy.lora_convert)."""
from __future__ import annotations

import os
import threading
from collections import OrderedDict

import comfy.lora_convert
import torch

from ..trilora_core import SafetensorsReader, TriLoRAFile, TriLoRAFileError, read_adapter_file

MAX_FILES = 8
_cache: OrderedDict[tuple, TriLoRAFile] = OrderedDict()
_lock = threading.Lock()


def file_signature(path: str) -> tuple:
    """(real path, mtime, size, inode, ctime): the change check of every file input (the loaders'
    files, Load Training Images' images and captions). A file replaced or rewritten in place with
    its old size and modification time (cp -p, rsync -t) still changes it: a replacement is a new
    inode, and ctime moves on every write and cannot be set back."""
    stat = os.stat(path)
    return (os.path.realpath(path), stat.st_mtime_ns, stat.st_size, stat.st_ino, stat.st_ctime_ns)


def comfy_renames(path: str) -> dict[str, str]:
    """{stored key: name}: the renames ComfyUI's comfy.lora_convert.convert_lora makes before it
    matches a file's keys (Wan-Fun's lora_unet__, Flux control and USO files). It runs on
    shape-only (meta) stand-ins of the tensors; a tensor it passes through keeps its identity,
    which maps each new name back to the stored key. A file the header reader refuses gets no
    renames, so read_adapter_file reports what is wrong with it."""
    try:
        with SafetensorsReader(path) as reader:
            stand_ins = {k: torch.empty(reader.shape(k), device="meta") for k in reader.keys()}
    except TriLoRAFileError:
        return {}
    stored = {id(t): k for k, t in stand_ins.items()}
    converted = comfy.lora_convert.convert_lora(stand_ins)
    return {stored[id(t)]: k for k, t in converted.items() if id(t) in stored and stored[id(t)] != k}


def load_cached(path: str) -> TriLoRAFile:
    signature = file_signature(path)
    with _lock:
        if signature in _cache:
            _cache.move_to_end(signature)
            return _cache[signature]
    parsed = read_adapter_file(path, comfy_renames(path))
    with _lock:
        for stale in [s for s in _cache if s[0] == signature[0]]:
            del _cache[stale]
        _cache[signature] = parsed
        while len(_cache) > MAX_FILES:
            _cache.popitem(last=False)
    return parsed
