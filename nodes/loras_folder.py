"""Node inputs that name files in ComfyUI's loras folder: the choice list, its check when a graph
is queued, and the fingerprint that re-runs a node when a chosen file is replaced on disk."""
from __future__ import annotations

import folder_paths
from comfy_api.latest import io

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
