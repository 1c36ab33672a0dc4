"""Every node's /object_info, as ComfyUI's server builds it, against a committed snapshot: node
ids, input names and order, defaults, ranges, tooltips and outputs are what saved workflows and
users depend on, so any change to them shows here first, byte for byte. File choice lists are
left out (they list the test's loras folder). The snapshot is ComfyUI 0.3.75's (CI's); on another
ComfyUI (make test-newest) the fields that ComfyUI adds to every node (0.33: search_aliases,
is_input_list, ...) are left out and the pack's own are compared.

After a deliberate change: TRILORA_UPDATE_OBJECT_INFO=1 pytest tests/comfy/test_object_info.py,
review the diff of tests/comfy/object_info.json, and rebuild the workflows if inputs changed
(scripts/make_workflows.py; test_workflows checks it)."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from harness import CI_COMFYUI, COMFY_VERSION

SNAPSHOT = Path(__file__).with_name("object_info.json")
FILE_INPUT = re.compile(r"^((trilora|lora)_name(_\d+)?|existing_lora)$")


def object_info(comfy_host) -> str:
    """Our nodes' info in ComfyUI's registration order, file lists replaced by a placeholder."""
    pack = comfy_host.pack.__name__
    infos = {}
    for node_id, cls in comfy_host.nodes.NODE_CLASS_MAPPINGS.items():
        if not cls.__module__.startswith(pack):
            continue
        info = cls.GET_NODE_INFO_V1()
        for section in info["input"].values():
            for name, entry in section.items():
                if FILE_INPUT.match(name):  # ["COMBO", {options, ...}]
                    spec = entry[1]
                    spec["options"] = [o for o in spec["options"] if o == "[None]"] + ["<files of the loras folder>"]
        infos[node_id] = info
    return json.dumps(infos, indent=1) + "\n"


def pack_fields(got, want):
    """``got`` with only the keys ``want`` has, at every depth: a key the snapshot has and ``got``
    lacks still shows as a difference, one a newer ComfyUI adds does not."""
    if isinstance(got, dict) and isinstance(want, dict):
        return {k: pack_fields(v, want[k]) for k, v in got.items() if k in want}
    if isinstance(got, list) and isinstance(want, list) and len(got) == len(want):
        return [pack_fields(g, w) for g, w in zip(got, want, strict=True)]
    return got


def test_object_info_is_the_committed_one(comfy_host):
    got = object_info(comfy_host)
    if os.environ.get("TRILORA_UPDATE_OBJECT_INFO"):
        assert COMFY_VERSION == CI_COMFYUI, "the snapshot is made on CI's ComfyUI (make setup's .comfyui)"
        SNAPSHOT.write_text(got)
    want = SNAPSHOT.read_text()
    if COMFY_VERSION != CI_COMFYUI:
        got = json.dumps(pack_fields(json.loads(got), json.loads(want)), indent=1) + "\n"
    assert got == want, ("a node's /object_info changed (ids, inputs, order, defaults, tooltips or outputs); if "
                         "that is meant, update the snapshot as this module's docstring says")


def test_every_node_id_is_its_class_name(comfy_host):
    pack = comfy_host.pack.__name__
    ours = {k: c for k, c in comfy_host.nodes.NODE_CLASS_MAPPINGS.items() if c.__module__.startswith(pack)}
    assert len(ours) == 15
    assert all(node_id == cls.__name__ for node_id, cls in ours.items())
