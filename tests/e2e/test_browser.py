"""The workflow files users drag into ComfyUI, in the real frontend: Debian's Chromium (headless,
network closed) on the real server's own page. Each workflow loads with every node type known and
no warning, converts with the frontend's own app.graphToPrompt(), and runs to success on the tiny
checkpoint; the TriLoRA nodes show their sliders and tooltips. Screenshots of every loaded
workflow go to test_artifacts/."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ARTIFACTS, COMFY, REPO, TINY
from PIL import Image, ImageStat

from harness.fixtures import workflow_models as fixtures
from harness.server import ComfyServer, execution_error
from harness.workflows import WORKFLOW_SPECS, workflow_id
from trilora_core import read_trilora

WORKFLOW_DIR = REPO / "workflows"
WORKFLOWS = sorted(WORKFLOW_DIR.glob("*.json"))
IDS = [p.stem for p in WORKFLOWS]
USER_CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
TRAIN_STEPS = 3
# Small enough for the tiny model on two CPU cores; every key must exist in the workflows that
# have the node (ComfyBrowser.set_widgets fails on a missing widget).
SMALL = {
    "CheckpointLoaderSimple": {"ckpt_name": TINY},
    "TriLoRASampleImages": {"size": 64},
    "TrainTriLoRA": {"steps": TRAIN_STEPS, "rank": 4, "learning_rate": 0.01, "training_dtype": "fp32",
                     "gradient_checkpointing": False},
    "KSampler": {"steps": 2},
    "EmptyLatentImage": {"width": 64, "height": 64},
}


# The SDXL and Flux workflows run on the random models of harness/fixtures/workflow_models.py. Flux's
# DualCLIPLoader builds T5-XXL at full size whatever the file holds (4.7B parameters), so the run
# loads a CLIP-L in its place (CLIPLoader): the fixture's Flux takes CLIP-L's 768-wide output.
FAMILY_SMALL = {
    "trilora_sdxl_train_and_generate": {"CheckpointLoaderSimple": {"ckpt_name": fixtures.SDXL_CHECKPOINT}},
    # The full-width random Flux diverges at the tiny SD1.5's learning rate.
    "trilora_flux_train_and_generate": {"TrainTriLoRA": {"learning_rate": 0.001},
                                        "UNETLoader": {"unet_name": fixtures.FLUX_MODEL},
                                        "VAELoader": {"vae_name": fixtures.FLUX_VAE},
                                        "EmptySD3LatentImage": {"width": 64, "height": 64}},
}
TEXT_ENCODER_STAND_IN = {"class_type": "CLIPLoader", "inputs": {"clip_name": fixtures.CLIP_L, "type": "stable_diffusion"}}
# What the user points each workflow's loaders at (the files the workflow names may be missing).
USER_FILES = {"CheckpointLoaderSimple.ckpt_name", "UNETLoader.unet_name", "DualCLIPLoader.clip_name1",
              "DualCLIPLoader.clip_name2", "VAELoader.vae_name"}


def read(path):
    return json.loads(path.read_text())


def node_types(workflow) -> set[str]:
    return {n["type"] for n in workflow["nodes"]}


def overrides_for(workflow, name: str = "", images: Path | None = None) -> dict:
    """Widget overrides that make a workflow run on the tiny models; ``images``: a folder of
    training images for the SDXL and Flux workflows (their text encoders are slow on a CPU)."""
    types = node_types(workflow)
    small = {t: dict(v) for t, v in SMALL.items() if t in types}
    for node_type, widgets in FAMILY_SMALL.get(name, {}).items():
        small.setdefault(node_type, {}).update(widgets)
    if name in FAMILY_SMALL and images is not None:
        small["TriLoRASampleImages"]["folder"] = str(images)
    return small


def with_stand_ins(prompt: dict) -> dict:
    """The API prompt with Flux's DualCLIPLoader swapped for the CLIP-L stand-in."""
    return {i: dict(TEXT_ENCODER_STAND_IN) if n["class_type"] == "DualCLIPLoader" else n for i, n in prompt.items()}


@pytest.fixture(scope="module")
def family_models(tmp_path_factory) -> Path:
    """The SDXL and Flux workflows' models, built once into the server's model folders (cached);
    returns a folder with two of the sample images and their captions for them to train on."""
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_workflow_fixtures.py"), "--comfyui", str(COMFY)],
                   check=True, capture_output=True)
    images = tmp_path_factory.mktemp("two_images")
    for picture in sorted((WORKFLOW_DIR / "sample_style").glob("*.png"))[:2]:
        shutil.copy(picture, images)
        shutil.copy(picture.with_suffix(".txt"), images)
    return images


@pytest.fixture(scope="module")
def runs(server, browser):
    """Every workflow converted in the browser and queued on the server, the one that trains
    first: the others name the file it saves (trilora_sample_style_00001_.safetensors in a fresh
    loras folder) as they ship. {name: (converted, history entry)}."""
    client = ComfyServer(server.url)
    results = {}
    sd15 = [p for p in WORKFLOWS if p.stem not in FAMILY_SMALL]
    for path in sorted(sd15, key=lambda p: ("SaveTriLoRA" not in node_types(read(p)), p.name)):
        workflow = read(path)
        converted = browser.convert(workflow, overrides_for(workflow), name=path.stem)
        results[path.stem] = (converted, client.run(converted.prompt, converted.workflow, timeout=600))
    return results


@pytest.fixture(scope="module")
def family_runs(server, browser, family_models):
    """run(name): the SDXL or Flux workflow converted in the browser and run on the server, once,
    in the first test that asks (minutes on a CPU: each test has its own time limit)."""
    done = {}

    def run(name: str):
        if name not in done:
            workflow = read(WORKFLOW_DIR / f"{name}.json")
            converted = browser.convert(workflow, overrides_for(workflow, name, family_models), name=name)
            converted.prompt = with_stand_ins(converted.prompt)
            done[name] = (converted, ComfyServer(server.url).run(converted.prompt, converted.workflow, timeout=1500))
        return done[name]

    return run


def test_the_pack_ships_its_workflows_with_thumbnails_and_comfyui_lists_them(server):
    assert {"trilora_generate", "trilora_train_style"} <= set(IDS)
    for path in WORKFLOWS:
        with Image.open(path.with_suffix(".jpg")) as thumb:
            assert thumb.format == "JPEG" and thumb.width >= 256
        served = server.get(f"/api/workflow_templates/comfyui-trilora/{path.name}")
        assert served == read(path)
        thumbnail = ComfyServer(server.url).get_bytes(f"/api/workflow_templates/comfyui-trilora/{path.stem}.jpg")
        assert thumbnail == path.with_suffix(".jpg").read_bytes()
    listed = server.get("/api/workflow_templates")
    assert sorted(listed["comfyui-trilora"]) == sorted(IDS)


@pytest.mark.parametrize("path", WORKFLOWS, ids=IDS)
def test_workflow_loads_in_the_frontend_with_every_node_known_and_no_warning(browser, path):
    workflow = read(path)
    loaded = browser.load(workflow, name=path.stem)
    assert loaded.missing == []
    assert loaded.notices == []
    # Only files the user points at: their models, and the TriLoRA the training workflow makes.
    assert all(f.split("=")[0] in USER_FILES or "=trilora_sample_style_" in f
               for f in loaded.missing_files), loaded.missing_files
    assert loaded.node_types == [n["type"] for n in workflow["nodes"]]
    assert browser.page.evaluate("app.graph.nodes.length") == len(workflow["nodes"])
    if "flux" in path.stem:
        assert browser.widget("UNETLoader", "unet_name")["value"] == "flux1-dev.safetensors"
        assert browser.widget("DualCLIPLoader", "type")["value"] == "flux"
    else:
        checkpoint = "sd_xl_base_1.0.safetensors" if "sdxl" in path.stem else USER_CHECKPOINT
        assert browser.widget("CheckpointLoaderSimple", "ckpt_name")["value"] == checkpoint
    notes = [n["widgets_values"][0] for n in workflow["nodes"] if n["type"] == "Note"]
    assert len(notes) == 1 and "What to change" in notes[0]
    shot = browser.screenshot(ARTIFACTS / f"{path.stem}.png")
    with Image.open(shot) as image:
        assert image.size == (1920, 1200)
        assert max(ImageStat.Stat(image.convert("L")).stddev) > 20  # a drawn graph, not a blank page


def test_a_workflow_with_an_unknown_node_type_is_reported(browser):
    workflow = read(WORKFLOW_DIR / "trilora_generate.json")
    workflow["nodes"][0] = {**workflow["nodes"][0], "type": "NoSuchTriLoRANode"}
    loaded = browser.load(workflow, name="broken")
    assert loaded.missing == ["NoSuchTriLoRANode"]
    assert len(loaded.notices) == 1  # the frontend's own dialog names it
    assert "missing nodes" in loaded.notices[0] and "NoSuchTriLoRANode" in loaded.notices[0]


def test_committed_workflows_are_what_make_workflows_builds_with_todays_nodes(browser):
    """Catches a node whose inputs changed since the files were made (their widget values are
    stored by position): rerun scripts/make_workflows.py then."""
    for name, spec in WORKFLOW_SPECS.items():
        built = browser.build({**spec(), "id": workflow_id(name)})
        assert built == read(WORKFLOW_DIR / f"{name}.json"), f"{name}.json is stale: run scripts/make_workflows.py"


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("name", IDS)
def test_workflow_converts_and_runs_to_success_on_the_tiny_model(runs, family_runs, name):
    converted, entry = family_runs(name) if name in FAMILY_SMALL else runs[name]
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    workflow = read(WORKFLOW_DIR / f"{name}.json")
    types = node_types(workflow) - {"Note"}
    if "DualCLIPLoader" in types:
        types = types - {"DualCLIPLoader"} | {"CLIPLoader"}
    assert {n["class_type"] for n in converted.prompt.values()} == types
    checkpoints = [n["inputs"]["ckpt_name"] for n in converted.prompt.values()
                   if n["class_type"] == "CheckpointLoaderSimple"]
    unets = [n["inputs"]["unet_name"] for n in converted.prompt.values() if n["class_type"] == "UNETLoader"]
    assert (checkpoints, unets) == {"trilora_sdxl_train_and_generate": ([fixtures.SDXL_CHECKPOINT], []),
                                    "trilora_flux_train_and_generate": ([], [fixtures.FLUX_MODEL])}.get(name, ([TINY], []))
    assert entry["outputs"], "no output node reported anything"


@pytest.mark.parametrize(("name", "prefix", "base_model", "sampling", "guidance"), [
    ("trilora_sdxl_train_and_generate", "trilora_sdxl_style", "sdxl_base_v1-0", "uniform", None),
    ("trilora_flux_train_and_generate", "trilora_flux_style", "flux1", "logit_normal", "1"),
])
@pytest.mark.timeout(1800)
def test_family_workflows_train_their_family_and_generate_with_it(family_runs, server, name, prefix, base_model,
                                                                   sampling, guidance):
    converted, entry = family_runs(name)
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    saved = sorted(server.loras.glob(f"{prefix}_*.safetensors"))
    assert len(saved) == 1
    meta = read_trilora(str(saved[0])).metadata
    assert (meta["ss_base_model_version"], meta["ss_timestep_sampling"], meta.get("ss_guidance_scale")) == (
        base_model, sampling, guidance)
    assert len(json.loads(meta["trilora_loss_history"])) == TRAIN_STEPS and meta["ss_num_train_images"] == "2"
    images = [i for out in entry["outputs"].values() for i in out.get("images", []) if i["type"] == "output"]
    assert [i["subfolder"] for i in images if "loss" not in i["filename"]] == ["trilora"]


def test_training_workflow_saves_a_trilora_plots_the_loss_and_previews_strengths(runs, server):
    converted, entry = runs["trilora_train_style"]
    by_type = {}
    for node_id, node in converted.prompt.items():
        by_type.setdefault(node["class_type"], []).append(node_id)
    train = converted.prompt[by_type["TrainTriLoRA"][0]]["inputs"]
    assert train["latents"][0] in by_type["VAEEncode"] and train["positive"][0] in by_type["CLIPTextEncode"]
    saved = sorted(server.loras.glob("trilora_sample_style_*.safetensors"))
    assert len(saved) == 1
    adapter = read_trilora(str(saved[0]))
    assert adapter.metadata["trilora_steps"] == str(TRAIN_STEPS)
    assert len(json.loads(adapter.metadata["trilora_loss_history"])) == TRAIN_STEPS
    assert max(int(layer.s.shape[0]) for layer in adapter.layers.values()) == 4
    assert entry["outputs"][by_type["LossGraphNode"][0]]["images"]
    strengths = sorted(converted.prompt[i]["inputs"]["strength"] for i in by_type["ApplyTriLoRA"])
    assert strengths == [0.0, 0.5, 1.0]
    client = ComfyServer(server.url)
    previews = {}
    for apply_id in by_type["ApplyTriLoRA"]:
        sampler = next(i for i in by_type["KSampler"] if converted.prompt[i]["inputs"]["model"][0] == apply_id)
        decode = next(i for i in by_type["VAEDecode"] if converted.prompt[i]["inputs"]["samples"][0] == sampler)
        shown = next(i for i in by_type["PreviewImage"] if converted.prompt[i]["inputs"]["images"][0] == decode)
        strength = converted.prompt[apply_id]["inputs"]["strength"]
        previews[strength] = client.file(entry["outputs"][shown]["images"][0])
    assert previews[0.0] != previews[1.0], "the trained TriLoRA changed nothing in the preview"


def test_generation_workflow_loads_the_file_the_training_workflow_saved(runs, server):
    converted, entry = runs["trilora_generate"]
    loader = next(n for n in converted.prompt.values() if n["class_type"] == "TriLoRALoader")
    assert loader["inputs"]["trilora_name"] == "trilora_sample_style_00001_.safetensors"  # as shipped
    assert (server.loras / loader["inputs"]["trilora_name"]).is_file()
    images = [i for out in entry["outputs"].values() for i in out.get("images", [])]
    assert len(images) == 1 and (server.output / images[0]["subfolder"] / images[0]["filename"]).is_file()


@pytest.mark.parametrize("workflow, node_type, widget", [
    ("trilora_generate", "TriLoRALoader", "strength_model"),
    ("trilora_generate", "TriLoRALoader", "strength_clip"),
    ("trilora_train_style", "ApplyTriLoRA", "strength"),
])
def test_strengths_are_sliders_with_their_tooltips(browser, server, workflow, node_type, widget):
    browser.load(read(WORKFLOW_DIR / f"{workflow}.json"), name=workflow)
    shown = browser.widget(node_type, widget)
    assert shown["type"] == "slider"
    assert (shown["options"]["min"], shown["options"]["max"]) == (-10, 10)
    spec = server.get(f"/object_info/{node_type}")[node_type]["input"]["required"][widget][1]
    assert browser.hover_tooltip(node_type, widget) == spec["tooltip"]


@pytest.mark.parametrize("node_type, widget", [
    ("TrainTriLoRA", "rank"), ("TrainTriLoRA", "learning_rate"), ("TrainTriLoRA", "training_dtype"),
    ("SaveTriLoRA", "filename_prefix"), ("TriLoRASampleImages", "folder"),
])
def test_training_nodes_show_their_tooltips(browser, server, node_type, widget):
    browser.load(read(WORKFLOW_DIR / "trilora_train_style.json"), name="trilora_train_style")
    inputs = server.get(f"/object_info/{node_type}")[node_type]["input"]
    spec = {**inputs["required"], **inputs.get("optional", {})}[widget][1]
    assert browser.hover_tooltip(node_type, widget) == spec["tooltip"]
