"""SaveTriLoRA: writes an in-memory TriLoRA into ComfyUI's loras folder, so the loaders list it
at once. Also the naming rules shared with the trainer's checkpoints: a prefix must stay inside
the loras folder, and a new file never replaces an existing one."""
from __future__ import annotations

import contextlib
import logging
import os
import re
import uuid
from collections.abc import Callable

import folder_paths
from comfy_api.latest import io

from ..trilora_core import TriLoRAFile, write_trilora

log = logging.getLogger("comfyui-trilora")

TRILORA = io.Custom("TRILORA")
EXTENSION = ".safetensors"
# Letters (any script), digits, space, '_', '-', '.'; '/' separates subfolders.
_PART_RE = re.compile(r"[\w\-. ]+")
_MAX_TRIES = 1000


def check_prefix(prefix: str, node: str, input_name: str = "filename_prefix") -> list[str]:
    """The prefix's path components; raises ValueError naming ``input_name`` when the prefix is
    empty, absolute, climbs out of the folder ('..'), or has characters file names should not."""
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
    for part in parts:
        if not part:
            raise ValueError(f"{where} has an empty folder name ('//' or a trailing '/')")
        bad = sorted({c for c in part if not _PART_RE.fullmatch(c)})
        if bad:
            shown = ", ".join(repr(c) for c in bad)
            raise ValueError(f"{where} has characters that are not allowed in file names: {shown}; "
                             "use letters, digits, space, '_', '-', '.' and '/' for subfolders")
        if part.startswith(".") or part != part.strip():
            raise ValueError(f"{where}: a file or folder name may not start with '.' or start or end "
                             "with a space")
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


class SaveTriLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SaveTriLoRA",
            display_name="Save TriLoRA",
            category="training",
            is_output_node=True,
            description="Saves a TriLoRA (e.g. from Train TriLoRA) into your loras folder in canonical form, "
                        "with its training arguments; it appears in the TriLoRA loaders at once.",
            inputs=[
                TRILORA.Input(id="trilora", tooltip="The TriLoRA to save, e.g. the TRILORA output of Train TriLoRA."),
                io.String.Input(
                    id="filename_prefix", default="trilora/trained",
                    tooltip="File name inside the loras folder ('/' makes subfolders). A counter is added "
                            "(name_00001_.safetensors) so no file is ever replaced."),
            ],
            outputs=[
                io.String.Output(display_name="filename",
                                 tooltip="The saved file's name as the loaders list it (relative to the loras folder)."),
            ],
        )

    @classmethod
    def execute(cls, trilora, filename_prefix):
        if not isinstance(trilora, TriLoRAFile) or not trilora.layers:
            raise ValueError("SaveTriLoRA: trilora holds no layers; connect the TRILORA output of Train TriLoRA")
        folder, base = prefix_location(filename_prefix, "SaveTriLoRA")
        path = save_new_file(trilora, folder, base)
        name = relative_name(path)
        log.info("TriLoRA saved to %s", path)
        return io.NodeOutput(name)


NODES = [SaveTriLoRA]
