"""SaveTriLoRA in the real ComfyUI: canonical files in the loras folder, listed at once, never
replacing a file, and prefixes that cannot leave the folder."""
from __future__ import annotations

import threading

import pytest
import torch

PREFIX = "lora_unet_input_blocks_1_1_proj_in"


def run(comfy_host, node_id, **inputs):
    cls = comfy_host.nodes.NODE_CLASS_MAPPINGS[node_id]
    with torch.inference_mode():
        out = cls.execute(**inputs)
    return tuple(out.result) if hasattr(out, "result") else out


def adapter(comfy_host, seed=0):
    """A non-canonical in-memory TriLoRA (random U, Vt; s of both signs) with training metadata."""
    core = comfy_host.core
    gen = torch.Generator().manual_seed(seed)
    layer = core.TriLoRALayer(torch.randn(320, 4, generator=gen), torch.randn(4, generator=gen),
                              torch.randn(4, 320, 1, 1, generator=gen), 4.0)
    return core.TriLoRAFile({PREFIX: layer}, {core.TRAINING_ARGS_KEY: '{"steps": 7}', "ss_base_model_version": "sd_v1"})


def test_saves_canonical_files_with_metadata_listed_at_once(comfy_host):
    core = comfy_host.core
    folder_paths = comfy_host.folder_paths
    folder_paths.get_filename_list("loras")  # fill ComfyUI's listing cache first
    trilora = adapter(comfy_host)
    name = run(comfy_host, "SaveTriLoRA", trilora=trilora, filename_prefix="saved/style")[0]
    assert name == "saved/style_00001_.safetensors"
    assert name in folder_paths.get_filename_list("loras")
    saved = core.read_trilora(comfy_host.loras / name)
    layer = saved.layers[PREFIX]
    assert core.is_canonical(layer) and torch.all(layer.s >= 0) and torch.all(layer.s[:-1] >= layer.s[1:])
    assert torch.allclose(layer.delta(), trilora.layers[PREFIX].delta(), atol=1e-5)
    meta = saved.metadata
    assert meta[core.TRAINING_ARGS_KEY] == '{"steps": 7}' and meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_network_module"] == "trilora" and meta["trilora_format"] == "1"


def test_never_overwrites(comfy_host):
    folder = comfy_host.loras / "never_overwrites"
    folder.mkdir()
    (folder / "x_00005_.safetensors").write_bytes(b"someone else's file")
    first = run(comfy_host, "SaveTriLoRA", trilora=adapter(comfy_host, 1), filename_prefix="never_overwrites/x")[0]
    second = run(comfy_host, "SaveTriLoRA", trilora=adapter(comfy_host, 1), filename_prefix="never_overwrites/x")[0]
    assert (first, second) == ("never_overwrites/x_00006_.safetensors", "never_overwrites/x_00007_.safetensors")
    assert (folder / "x_00005_.safetensors").read_bytes() == b"someone else's file"
    assert (comfy_host.loras / first).read_bytes() == (comfy_host.loras / second).read_bytes()

    # Saves racing for the same next name all get their own file.
    names, errors = [], []

    def save(seed):
        try:
            names.append(run(comfy_host, "SaveTriLoRA", trilora=adapter(comfy_host, seed), filename_prefix="race/y")[0])
        except Exception as err:  # collected: a thread's exception would otherwise vanish
            errors.append(err)

    threads = [threading.Thread(target=save, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(names)) == 4
    contents = {(comfy_host.loras / n).read_bytes() for n in names}
    assert len(contents) == 4  # four different adapters, none replaced by another
    assert not [p for p in (comfy_host.loras / "race").iterdir() if not p.name.endswith(".safetensors")]


ALLOWED = "anything but < > : \" \\ | ? * and control characters is, and '/' separates subfolders"
# Names ComfyUI's own Save LoRA writes, and file systems take.
LEGAL = ["my style (v2)", "char's style", "detail+light", "[wip] style", "styles (2024)/50% & more, #1 {a}", "стиль/風格"]


@pytest.mark.parametrize("prefix", LEGAL)
def test_saves_every_name_a_file_system_and_comfyui_accept(comfy_host, prefix):
    name = run(comfy_host, "SaveTriLoRA", trilora=adapter(comfy_host), filename_prefix=prefix)[0]
    assert name == f"{prefix}_00001_.safetensors"
    assert name in comfy_host.folder_paths.get_filename_list("loras")
    loader = comfy_host.nodes.NODE_CLASS_MAPPINGS["TriLoRALoader"]
    assert loader.validate_inputs(trilora_name=name) is True  # the graph with this name queues
    assert PREFIX in comfy_host.core.read_trilora(comfy_host.loras / name).layers


@pytest.mark.parametrize(("prefix", "message"), [
    ("../x", "SaveTriLoRA: filename_prefix '../x' leaves the loras folder ('..' or '.' is not allowed); "
             "use a name such as 'trilora/my_style'"),
    ("sub/../../x", "SaveTriLoRA: filename_prefix 'sub/../../x' leaves the loras folder ('..' or '.' is not "
                    "allowed); use a name such as 'trilora/my_style'"),
    ("/abs/x", "SaveTriLoRA: filename_prefix '/abs/x' is an absolute path; give a name relative to the loras "
               "folder, such as 'trilora/my_style'"),
    ("C:/x", "SaveTriLoRA: filename_prefix 'C:/x' is an absolute path; give a name relative to the loras "
             "folder, such as 'trilora/my_style'"),
    ("a*b?", f"SaveTriLoRA: filename_prefix 'a*b?' has characters that are not allowed in file names: '*', '?'; "
             f"{ALLOWED}"),
    ("a\\b", f"SaveTriLoRA: filename_prefix 'a\\\\b' has characters that are not allowed in file names: '\\\\'; "
             f"{ALLOWED}"),
    ('x<y>:"z|', f"SaveTriLoRA: filename_prefix 'x<y>:\"z|' has characters that are not allowed in file names: "
                 f"'\"', ':', '<', '>', '|'; {ALLOWED}"),
    ("tab\there", f"SaveTriLoRA: filename_prefix 'tab\\there' has characters that are not allowed in file names: "
                  f"'\\t'; {ALLOWED}"),
    ("CON/x", "SaveTriLoRA: filename_prefix 'CON/x': 'CON' is a reserved device name on Windows (CON, PRN, AUX, NUL, "
              "COM1-9, LPT1-9); choose another name"),
    ("sub/lpt1.d/x", "SaveTriLoRA: filename_prefix 'sub/lpt1.d/x': 'lpt1.d' is a reserved device name on Windows (CON, "
                     "PRN, AUX, NUL, COM1-9, LPT1-9); choose another name"),
    ("wip./x", "SaveTriLoRA: filename_prefix 'wip./x': a folder name may not end with '.'"),
    (".hidden", "SaveTriLoRA: filename_prefix '.hidden': a file or folder name may not start with '.' or start or "
                "end with a space"),
    ("", "SaveTriLoRA: filename_prefix '' is empty; give a file name such as 'trilora/my_style'"),
    ("x/", "SaveTriLoRA: filename_prefix 'x/' has an empty folder name ('//' or a trailing '/')"),
])
def test_refuses_prefixes_that_leave_the_folder_or_have_odd_characters(comfy_host, prefix, message):
    before = sorted(p.relative_to(comfy_host.loras) for p in comfy_host.loras.rglob("*"))
    with pytest.raises(ValueError) as err:
        run(comfy_host, "SaveTriLoRA", trilora=adapter(comfy_host), filename_prefix=prefix)
    assert str(err.value) == message
    assert sorted(p.relative_to(comfy_host.loras) for p in comfy_host.loras.rglob("*")) == before


def test_refuses_an_empty_adapter(comfy_host):
    with pytest.raises(ValueError) as err:
        run(comfy_host, "SaveTriLoRA", trilora=comfy_host.core.TriLoRAFile({}, {}), filename_prefix="x")
    assert str(err.value) == "SaveTriLoRA: trilora holds no layers; connect the TRILORA output of Train TriLoRA"
