"""The command line on separate model files (nodes/cli_models.py): a diffusion model, its text
encoder(s) and VAE, loaded by ComfyUI's own loader nodes (the tiny Flux of the workflow tests:
its diffusion model, a CLIP-L and a TAEF1-shaped VAE, each a file of its own), a float8 base by
UNETLoader's weight_dtype, and the option errors before anything loads."""
from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import COMFY, REPO, TINY
from safetensors import safe_open

from harness.fixtures import workflow_models

FILES = {"unet": workflow_models.FLUX_MODEL, "clip": workflow_models.CLIP_L, "vae": workflow_models.FLUX_VAE}


@pytest.fixture(scope="module")
def cli(comfy_host):
    for name in FILES.values():
        workflow_models.ensure(name, COMFY / "models")
    return importlib.import_module(comfy_host.pack.__name__ + ".nodes.train_cli")


def parse(cli, *argv):
    parser, known = cli.build_parser([])
    return cli.resolve(parser.parse_args(list(argv)), known)


SPLIT = ("--unet", FILES["unet"], "--clip", FILES["clip"], "--vae", FILES["vae"])


@pytest.mark.parametrize(("flags", "message"), [
    ((), "give checkpoint (one file), or unet with clip and vae (separate files), not neither"),
    (("--checkpoint", TINY, "--unet", FILES["unet"]), "not both"),
    (("--checkpoint", TINY, "--vae", FILES["vae"]), "vae is for a unet; a checkpoint holds its own"),
    (("--unet", FILES["unet"], "--clip", FILES["clip"]), "unet needs vae too"),
    (("--unet", "nothing.safetensors", "--clip", FILES["clip"], "--vae", FILES["vae"]),
     "unet 'nothing.safetensors': no such file, and not in ComfyUI's diffusion_models folder"),
    ((*SPLIT[:2], "--clip", "a, b, c, d", *SPLIT[4:]), "clip: 4 files; ComfyUI's loaders take one, two or three"),
    ((*SPLIT, "--clip_type", "sdxl"), "clip_type = 'sdxl': CLIPLoader, which loads 1 text encoder file, takes one of"),
    ((*SPLIT[:2], "--clip", f"{FILES['clip']}, {FILES['clip']}", *SPLIT[4:]),
     "clip_type = 'stable_diffusion': DualCLIPLoader, which loads 2 text encoder files, takes one of sdxl"),
])
def test_the_model_options_say_what_is_wrong_before_anything_loads(cli, flags, message):
    with pytest.raises(cli.ConfigError, match=re.escape(message)):
        cli.setup_folders(parse(cli, *flags))


def test_weight_dtype_loads_the_diffusion_model_in_float8_as_unetloader_does(cli):
    models = importlib.import_module(cli.__name__.rsplit(".", 1)[0] + ".cli_models")
    values = parse(cli, *SPLIT, "--weight_dtype", "fp8_e4m3fn")
    with torch.inference_mode():
        model, clip, vae = models.load(values, cli.setup_folders(values))
    dtypes = {t.dtype for k, t in model.model.diffusion_model.state_dict().items() if k.endswith(".weight") and t.ndim == 2}
    assert dtypes == {torch.float8_e4m3fn}
    assert type(model.model).__name__ == "Flux" and clip.cond_stage_model is not None and vae.latent_channels == 16
    values = parse(cli, "--checkpoint", TINY, "--weight_dtype", "fp8_e4m3fn")  # a checkpoint's diffusion model too
    with torch.inference_mode():
        model = models.load(values, cli.setup_folders(values))[0]
    assert {t.dtype for k, t in model.model.diffusion_model.state_dict().items()
            if k.endswith(".weight") and t.ndim == 4} == {torch.float8_e4m3fn}


def test_a_run_on_separate_files_trains_and_saves_the_flux_adapter(cli, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", COMFYUI_DIR=str(COMFY))
    proc = subprocess.run([sys.executable, str(REPO / "train_trilora.py"), *SPLIT, "--weight_dtype", "fp8_e4m3fn",
                           "--folder", "", "--size", "64", "--steps", "1", "--rank", "2", "--validate_every", "0",
                           "--preview_every", "0", "--loras_dir", str(tmp_path / "loras"), "--log_dir",
                           str(tmp_path / "log")], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = (tmp_path / "loras" / "trilora").glob("trained_*.safetensors")
    with safe_open(str(path), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["modelspec.architecture"].startswith("flux") and keys
    assert all(k.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_", "diffusion_model."))
               for k in keys), keys[:5]
    assert json.loads(meta["trilora_training_args"])["steps"] == 1
