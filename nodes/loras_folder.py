"""ComfyUI's loras folder, as the nodes use it. Reading: the file choice list, its check when a
graph is queued, and the fingerprint that re-runs a node when a chosen file is replaced on disk.
Writing: a filename_prefix must stay inside the loras folder, and a new file never replaces an
existing one (SaveTriLoRA, the tools and the trainer's checkpoints)."""
from __future__ import annotations

import contextlib
import os
import re
import uuid
from collections.abc import Callable

import folder_paths
from comfy_api.latest import io

from ..trilora_core import TriLoRAFile, write_trilora
from .file_cache import file_signature

NONE_FILE = "[None]"  # the choice that names no file, where a file is not required


def file_choice(input_id: str, tooltip: str, none: bool = False, optional: bool = False) -> io.Combo.Input:
    names = folder_paths.get_filename_list("loras")
    if none:
        return io.Combo.Input(id=input_id, options=[NONE_FILE, *names], default=NONE_FILE, optional=optional,
                              tooltip=tooltip)
    return io.Combo.Input(id=input_id, options=names, optional=optional, tooltip=tooltip)


def check_names(*names, none: bool = True) -> bool | str:
    """validate_inputs for file choices: True, or what is wrong with the first bad name. ComfyUI
    0.3.75 checks V3 combo values against no options list (its own check runs for V1 nodes only).
    None is a linked input; NONE_FILE passes where ``none`` allows it."""
    files = None
    for name in names:
        if name is None or (none and name == NONE_FILE):
            continue
        files = folder_paths.get_filename_list("loras") if files is None else files
        if name not in files:
            return f"'{name}' is not in the loras folder"
    return True


def files_fingerprint(*names) -> str:
    """Changes when a chosen file is replaced on disk, not only when a name changes."""
    parts = []
    for name in names:
        try:
            parts.append(str(file_signature(folder_paths.get_full_path_or_raise("loras", name))))
        except Exception:  # no name, NONE_FILE, a linked input or a missing file: the name itself
            parts.append(str(name))
    return "|".join(parts)


class LorasFileNode(io.ComfyNode):
    """A node whose trilora_name names a file of the loras folder: the name is checked when the
    graph is queued, and the node re-runs when the file is replaced on disk."""

    @classmethod
    def validate_inputs(cls, trilora_name):
        return check_names(trilora_name, none=False)

    @classmethod
    def fingerprint_inputs(cls, trilora_name=None, **_):
        return files_fingerprint(trilora_name)


class OptionalLorasFileNode(LorasFileNode):
    """The same where trilora_name may be NONE_FILE, because a TRILORA input can stand in for it."""

    @classmethod
    def validate_inputs(cls, trilora_name=None):
        return check_names(trilora_name)


# --------------------------------------------------------------------------- new files

EXTENSION = ".safetensors"
# What a file name may not hold on any system ComfyUI runs on (Windows is the strictest): its
# forbidden characters and control characters, and its reserved device names. Anything else
# ('my style (v2)', "char's style", 'detail+light', '[wip] style', any script) is a legal name,
# as ComfyUI's own Save LoRA writes it; '/' separates subfolders.
_FORBIDDEN = set('<>:"\\|?*') | {chr(c) for c in range(32)} | {chr(127)}
_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"{d}{i}" for d in ("COM", "LPT") for i in range(1, 10))}
_MAX_TRIES = 1000


def _check_part(part: str, where: str, folder: bool) -> None:
    """One path component. A file's base name always gets '_<counter>_...' after it, so only a
    folder name can end in '.' or be a reserved name (Windows drops the one and refuses the other)."""
    if not part:
        raise ValueError(f"{where} has an empty folder name ('//' or a trailing '/')")
    bad = sorted(c for c in set(part) if c in _FORBIDDEN)
    if bad:
        shown = ", ".join(repr(c) for c in bad)
        raise ValueError(f"{where} has characters that are not allowed in file names: {shown}; "
                         "anything but < > : \" \\ | ? * and control characters is, and '/' separates subfolders")
    if part.startswith(".") or part != part.strip():
        raise ValueError(f"{where}: a file or folder name may not start with '.' or start or end with a space")
    if folder and part.endswith("."):
        raise ValueError(f"{where}: a folder name may not end with '.'")
    if folder and part.split(".")[0].upper() in _RESERVED:
        raise ValueError(f"{where}: {part!r} is a reserved device name on Windows (CON, PRN, AUX, NUL, "
                         "COM1-9, LPT1-9); choose another name")


def check_prefix(prefix: str, node: str, input_name: str = "filename_prefix") -> list[str]:
    """The prefix's path components; raises ValueError naming ``input_name`` when the prefix is
    empty, absolute, climbs out of the folder ('..'), or names what a file system refuses (see
    _FORBIDDEN, _RESERVED). Every node that writes into the loras folder checks its prefix here."""
    where = f"{node}: {input_name} {prefix!r}"
    if not isinstance(prefix, str) or not prefix.strip():
        raise ValueError(f"{where} is empty; give a file name such as 'trilora/my_style'")
    if prefix.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", prefix) or os.path.isabs(prefix):
        raise ValueError(f"{where} is an absolute path; give a name relative to the loras folder, "
                         "such as 'trilora/my_style'")
    parts = prefix.split("/")
    if any(part in ("..", ".") for part in parts):
        raise ValueError(f"{where} leaves the loras folder ('..' or '.' is not allowed); "
                         "use a name such as 'trilora/my_style'")
    for i, part in enumerate(parts):
        _check_part(part, where, folder=i < len(parts) - 1)
    return parts


def loras_root() -> str:
    return folder_paths.get_folder_paths("loras")[0]


def prefix_location(prefix: str, node: str, input_name: str = "filename_prefix") -> tuple[str, str]:
    """(folder, base name) the prefix names inside the first loras folder; checked as above."""
    parts = check_prefix(prefix, node, input_name)
    root = os.path.realpath(loras_root())
    folder = os.path.realpath(os.path.join(root, *parts[:-1]))
    if os.path.commonpath([root, folder]) != root:  # e.g. a subfolder that is a symlink elsewhere
        raise ValueError(f"{node}: {input_name} {prefix!r} leaves the loras folder")
    return folder, parts[-1]


def _next_counter(folder: str, base: str) -> int:
    pattern = re.compile(re.escape(base) + r"_(\d+)_")
    highest = 0
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(folder):
            match = pattern.match(name)
            if match:
                highest = max(highest, int(match.group(1)))
    return highest + 1


def _refresh_lora_list() -> None:
    # folder_paths caches listings by folder mtime; drop the entry so the new file shows at once.
    cache = getattr(folder_paths, "filename_list_cache", None)
    if isinstance(cache, dict):
        cache.pop("loras", None)


def save_new_file(adapter: TriLoRAFile, folder: str, base: str, suffix: str = "") -> str:
    """Writes a TriLoRA as ``<folder>/<base>_<counter>_<suffix>.safetensors`` (see place_new_file)."""
    return place_new_file(lambda tmp: write_trilora(tmp, adapter.layers, adapter.metadata), folder, base, suffix)


def place_new_file(write: Callable[[str], None], folder: str, base: str, suffix: str = "") -> str:
    """``write(tmp)``, then gives the finished file the name ``<base>_<counter>_<suffix>.safetensors``
    with the next free counter and returns its path. Never replaces a file: the file is hard-linked
    to its name, which fails if the name exists (then the next counter is tried)."""
    os.makedirs(folder, exist_ok=True)
    counter = _next_counter(folder, base)
    tmp = os.path.join(folder, f".{base}.{uuid.uuid4().hex}.partial")
    write(tmp)
    try:
        for _ in range(_MAX_TRIES):
            path = os.path.join(folder, f"{base}_{counter:05}_{suffix}{EXTENSION}")
            try:
                os.link(tmp, path)
                break
            except FileExistsError:
                counter += 1
            except OSError:  # file systems without hard links: check, then rename
                if os.path.exists(path):
                    counter += 1
                    continue
                os.replace(tmp, path)
                break
        else:
            raise FileExistsError(f"no free file name for {base} in {folder}")
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    _refresh_lora_list()
    return path


def relative_name(path: str) -> str:
    """The name the loaders list for a file in the first loras folder."""
    return os.path.relpath(path, os.path.realpath(loras_root())).replace(os.sep, "/")
