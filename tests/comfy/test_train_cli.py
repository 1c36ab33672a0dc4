"""The command-line trainer (train_trilora.py): real ComfyUI, real torchrun with 2 gloo ranks on
the CPU, the tiny SD1.5 checkpoint, the bundled sample images at 64 px.

Each run is a process of its own (torchrun's workers, or plain python), as a user starts it;
torch runs with one thread per process (OMP_NUM_THREADS=1, torchrun's own default for several
ranks), so that 2 ranks on a shared 2-core machine do not wait on each other's threads."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch
from conftest import COMFY, REPO, TINY
from PIL import Image
from safetensors import safe_open

SCRIPT = REPO / "train_trilora.py"
STEPS = 4
# Differ between a 2-rank run with batch 1 and a 1-process run with batch 2, and only these.
PER_RUN_KEYS = {"ss_batch_size_per_device", "trilora_training_args", "trilora_loss_history", "trilora_curves"}


def config(tmp: Path) -> Path:
    path = tmp / "run.toml"
    path.write_text(f"""
checkpoint = "{TINY}"
loras_dir = "{tmp / 'loras'}"
folder = ""        # the sample set bundled with the pack: 8 images with captions
size = 64
steps = {STEPS}
rank = 4
seed = 7
training_dtype = "fp32"
gradient_checkpointing = false
checkpoint_every = 2
log_dir = "{tmp / 'log'}"
validation_split = 0.25   # 2 of the 8 images held out
validate_every = 2
preview_every = 2
""")
    return path


def command(ranks: int | None, tmp: Path, *flags: str) -> list[str]:
    """python train_trilora.py, or torchrun with ``ranks`` workers whose output goes to files."""
    cli = [str(SCRIPT), "--config", str(config(tmp)), *flags]
    if ranks is None:
        return [sys.executable, *cli]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
            f"--log-dir={tmp / 'logs'}", "--redirects=3", *cli]


def start(ranks: int | None, tmp: Path, *flags: str) -> subprocess.Popen:
    tmp.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", COMFYUI_DIR=str(COMFY))
    return subprocess.Popen(command(ranks, tmp, *flags), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def finish(proc: subprocess.Popen, tmp: Path, timeout: float = 300) -> SimpleNamespace:
    out, _ = proc.communicate(timeout=timeout)
    logs = {int(p.parent.name): p.read_text() + p.with_name("stdout.log").read_text()
            for p in (tmp / "logs").glob("**/stderr.log")}
    return SimpleNamespace(rc=proc.returncode, out=out, rank_logs=logs, loras=tmp / "loras")


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def only(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    assert len(found) == 1, (pattern, sorted(p.name for p in folder.iterdir()))
    return found[0]


def report(run) -> str:
    return f"rc {run.rc}\n{run.out[-4000:]}\n" + "\n".join(f"--- rank {r}\n{t[-3000:]}" for r, t in run.rank_logs.items())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    two = finish(start(2, root / "two", "--batch_size", "1"), root / "two")
    assert two.rc == 0, report(two)
    # From the 2-rank run's step-2 checkpoint, on one process, next to an uninterrupted 1-process run.
    (root / "resumed" / "loras").mkdir(parents=True)
    for part in only(two.loras / "trilora" / "checkpoints", "*_step000002.safetensors"), \
            only(two.loras / "trilora" / "checkpoints", "*_step000002.optim"):
        (root / "resumed" / "loras" / part.name).write_bytes(part.read_bytes())
    resumed_from = only(root / "resumed" / "loras", "*.safetensors").name
    procs = {"one": start(None, root / "one", "--batch_size", "2"),
             "resumed": start(None, root / "resumed", "--batch_size", "2", "--steps", "2",
                              "--existing_lora", resumed_from)}
    done = {name: finish(proc, root / name) for name, proc in procs.items()}
    for run in done.values():
        assert run.rc == 0, report(run)
    return SimpleNamespace(two=two, **done)


def final_file(run) -> Path:
    return only(run.loras / "trilora", "trained_*.safetensors")


def test_two_ranks_with_batch_1_give_the_file_of_one_process_with_batch_2(runs):
    two, two_meta = read(final_file(runs.two))
    one, one_meta = read(final_file(runs.one))
    assert two.keys() == one.keys() and len(two) > 100
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6, msg=key)
    # The same file: the same training record (the global batch is the batch), loss by loss.
    assert {k: v for k, v in two_meta.items() if k not in PER_RUN_KEYS} == \
           {k: v for k, v in one_meta.items() if k not in PER_RUN_KEYS}
    two_args, one_args = json.loads(two_meta["trilora_training_args"]), json.loads(one_meta["trilora_training_args"])
    assert two_args == one_args and two_args["batch_size"] == 2 and two_args["steps"] == STEPS
    assert (two_meta["ss_batch_size_per_device"], one_meta["ss_batch_size_per_device"]) == ("1", "2")
    assert two_meta["ss_total_batch_size"] == "2"
    assert json.loads(two_meta["trilora_loss_history"]) == pytest.approx(
        json.loads(one_meta["trilora_loss_history"]), rel=1e-5)
    # Canonical SVD form, as every file the pack writes.
    prefix = next(k[: -len(".trilora_u")] for k in one if k.endswith(".trilora_u"))
    u, s = two[f"{prefix}.trilora_u"], two[f"{prefix}.trilora_s"]
    torch.testing.assert_close(u.T @ u, torch.eye(u.shape[1]), atol=1e-5, rtol=0)
    assert torch.all(s[:-1] >= s[1:]) and torch.all(s >= 0) and s.abs().sum() > 0


def test_only_rank_0_writes_files_and_logs(runs):
    checkpoints = sorted(p.name for p in (runs.two.loras / "trilora" / "checkpoints").iterdir())
    assert [re.sub(r"_\d{5}_", "_N_", n) for n in checkpoints] == [
        "trilora_N_step000002.optim", "trilora_N_step000002.safetensors",
        "trilora_N_step000004.optim", "trilora_N_step000004.safetensors"]
    assert runs.two.rank_logs[1] == ""
    assert "TriLoRA saved as trilora/trained_00001_.safetensors (4 steps)" in runs.two.rank_logs[0]
    assert re.search(r"4 steps on 2 ranks; after the first step [\d.]+ steps/s, [\d.]+ images/s, [\d.]+ CPU s/step",
                     runs.two.rank_logs[0])


def test_the_log_and_the_file_hold_the_curves_and_the_console_prints_them(runs):
    _, meta = read(final_file(runs.one))
    curves = json.loads(meta["trilora_curves"])
    assert curves["eval_steps"] == [0, 2, 4] and len(curves["heldout"]) == len(curves["drift"]) == 3
    folder = runs.one.loras.parent / "log"
    rows = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert [r["loss"] for r in rows if "loss" in r] == pytest.approx(json.loads(meta["trilora_loss_history"]),
                                                                      rel=1e-5)
    evals = [r for r in rows if "heldout" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]
    assert [r["heldout"] for r in evals] == pytest.approx(curves["heldout"], rel=1e-5)
    assert [r["drift"] for r in evals] == pytest.approx(curves["drift"], rel=1e-5)
    assert evals[0]["drift"] == 0.0 and evals[-1]["drift"] > 0  # the empty prompt moves once s moves
    assert (folder / "curves.png").stat().st_size > 1000
    previews = [r["preview"] for r in rows if "preview" in r]
    assert previews == ["preview_step000002.png", "preview_step000004.png"]
    for name in previews:  # decoded with the checkpoint's VAE: 8x8 latents -> 64x64 pictures
        with Image.open(folder / name) as picture:
            assert picture.size == (64, 64)
    assert "TriLoRA evaluations:" in runs.one.out and "heldout  heldout_x0  drift  drift_x0" in runs.one.out
    assert (runs.two.loras.parent / "log" / "log.jsonl").read_text().count('"step": 0,') == 1  # rank 0 only


def test_a_two_rank_checkpoint_resumes_on_one_process_exactly(runs):
    two, _ = read(final_file(runs.two))
    resumed, meta = read(final_file(runs.resumed))
    for key in two:
        torch.testing.assert_close(resumed[key], two[key], rtol=1e-5, atol=1e-6, msg=key)
    args = json.loads(meta["trilora_training_args"])
    assert (meta["trilora_steps"], args["resumed_from_step"]) == (str(STEPS), 2)


def test_text_encoder_training_on_two_ranks_gives_the_file_of_one_process(tmp_path):
    # The CLI encodes the folder's captions at every step with the checkpoint's CLIP; the text encoders'
    # gradients are all-reduced with the UNet's, so 2 ranks of batch 1 make the 1-process batch-2 file.
    flags = ("--steps", "2", "--text_encoder_lr", "1e-3", "--shuffle_caption", "true", "--keep_tokens", "1",
             "--caption_dropout_rate", "0.25", "--validation_split", "0", "--validate_every", "0",
             "--preview_every", "0", "--checkpoint_every", "0")
    procs = {"two": start(2, tmp_path / "two", "--batch_size", "1", *flags),
             "one": start(None, tmp_path / "one", "--batch_size", "2", *flags)}
    done = {name: finish(proc, tmp_path / name) for name, proc in procs.items()}
    for run in done.values():
        assert run.rc == 0, report(run)
    two, two_meta = read(final_file(done["two"]))
    one, one_meta = read(final_file(done["one"]))
    assert two.keys() == one.keys()
    te = [k for k in one if k.startswith("lora_te_") and k.endswith(".trilora_s")]
    assert len(te) == 48 and all(float(one[k].abs().max()) > 0 for k in te)
    # The CPU's CLIP runs in fp16, whose backward rounds differently for a batch split over ranks: the
    # text encoders' updates, and through the captions they encode the UNet's, agree to fp16's rounding
    # (2^-11; measured: 2.4e-4 of the largest entry). A rank updating from its own image alone would
    # miss half of the gradient: an error of the update's size.
    for prefix in (k.removesuffix(".trilora_s") for k in one if k.endswith(".trilora_s")):
        delta_two, delta_one = ((f[f"{prefix}.trilora_u"] * f[f"{prefix}.trilora_s"]) @ f[f"{prefix}.trilora_vt"].flatten(1)
                                for f in (two, one))
        torch.testing.assert_close(delta_two, delta_one, rtol=0, atol=1e-3 * float(delta_one.abs().max()), msg=prefix)
    assert (one_meta["ss_text_encoder_lr"], one_meta["ss_caption_dropout_rate"]) == ("0.001", "0.25")


def _rank_pid(torchrun: subprocess.Popen, local_rank: int, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in psutil.Process(torchrun.pid).children():
            try:
                if child.environ().get("LOCAL_RANK") == str(local_rank):
                    return child.pid
            except psutil.Error:
                continue
        time.sleep(0.2)
    raise AssertionError(f"no worker with LOCAL_RANK={local_rank}")


def _after_step(tmp: Path, torchrun: subprocess.Popen, step: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    pattern = f"*_step{step:06d}.safetensors"
    while not list((tmp / "loras" / "trilora" / "checkpoints").glob(pattern)):
        assert torchrun.poll() is None and time.monotonic() < deadline, f"no checkpoint of step {step}"
        time.sleep(0.1)


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["killed", "terminated"])
def test_a_rank_that_stops_ends_every_rank_with_the_last_good_adapter_saved_once(tmp_path, how):
    proc = start(2, tmp_path, "--batch_size", "1", "--steps", "1000", "--checkpoint_every", "1")
    worker = _rank_pid(proc, 1)
    _after_step(tmp_path, proc, 2)
    os.kill(worker, how)
    run = finish(proc, tmp_path, timeout=120)
    assert run.rc != 0, report(run)
    log = run.rank_logs[0]
    # Rank 1 killed: its connection breaks, or torchrun's SIGTERM comes first; terminated: it says so.
    what = (r"(lost another rank \(.+; torchrun's report names it\)|stopped by SIGTERM \(torchrun sends it to every "
            r"rank once one has failed: see its report\))" if how == signal.SIGKILL
            else r"rank 1 stopped: StopRequested: SIGTERM")
    match = re.search(rf"train_trilora\.py: error: TrainTriLoRA: {what}, at step \d+ of 1000\. The adapter after "
                      rf"step (?P<done>\d+) was saved to (?P<path>\S+_last_good\.safetensors); choose it as "
                      rf"existing_lora", log)
    assert match, report(run)
    folder = tmp_path / "loras" / "trilora" / "checkpoints"
    last_good = only(folder, "*_last_good.safetensors")
    assert str(last_good) == match["path"]
    done = int(match["done"])
    assert done >= 2 and read(last_good)[1]["trilora_steps"] == str(done)
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no half-written file
    assert not (tmp_path / "loras" / "trilora" / "trained_00001_.safetensors").exists()
    if how == signal.SIGTERM:  # rank 1 reported through rank 0 and said nothing itself
        assert "error" not in run.rank_logs[1]


# ---- the dataset cache: written once by rank 0, read by every rank


def cache_line(log: str) -> tuple[int, int]:
    found = re.search(r"TriLoRA dataset cache .*: (\d+) items read, (\d+) encoded", log)
    assert found, log[-3000:]
    return int(found[1]), int(found[2])


def test_two_ranks_read_the_cache_rank_0_wrote_and_a_later_run_encodes_nothing(runs, tmp_path):
    cache = tmp_path / "sample_set.safetensors"
    two = finish(start(2, tmp_path / "two", "--batch_size", "1", "--cache", str(cache)), tmp_path / "two")
    assert two.rc == 0, report(two)
    n_read, encoded = cache_line(two.rank_logs[0])
    assert n_read == 0 and encoded > 8 and cache.is_file()  # 8 images and their captions
    assert two.rank_logs[1] == ""  # rank 1 read the file (it never encodes: a missing item is an error)
    # The same file as the 2-rank run without a named cache, whose ranks shared a file of the run.
    cached, _ = read(final_file(two))
    plain, _ = read(final_file(runs.two))
    for key in plain:
        torch.testing.assert_close(cached[key], plain[key], rtol=1e-5, atol=1e-6, msg=key)
    assert not list((COMFY / "temp").glob("trilora_dataset_*"))  # the run's own file, deleted once read
    written = cache.read_bytes()
    one = finish(start(None, tmp_path / "one", "--batch_size", "2", "--cache", str(cache)), tmp_path / "one")
    assert one.rc == 0, report(one)
    assert cache_line(one.out) == (encoded, 0) and cache.read_bytes() == written
    again, _ = read(final_file(one))
    for key in plain:
        torch.testing.assert_close(again[key], plain[key], rtol=1e-5, atol=1e-6, msg=key)


def test_a_foreign_cache_stops_the_run_naming_the_file_before_training(tmp_path):
    lora = tmp_path / "some_lora.safetensors"
    from safetensors.torch import save_file
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 4)}, str(lora))
    run = finish(start(None, tmp_path, "--cache", str(lora)), tmp_path)
    assert run.rc == 1
    assert f"train_trilora.py: error: {lora}: not a TriLoRA dataset cache" in run.out
    assert "Traceback" not in run.out
    assert not (tmp_path / "loras" / "trilora").exists()


# ---- options, in process: the parser and the checks, without a run


@pytest.fixture(scope="module")
def cli(comfy_host):
    import importlib

    return importlib.import_module(comfy_host.pack.__name__ + ".nodes.train_cli")


def _parse(cli, *argv):
    parser, known = cli.build_parser([])
    return cli.resolve(parser.parse_args(list(argv)), known)


def test_every_widget_input_of_the_nodes_is_an_option_with_the_nodes_default_and_tooltip(comfy_host, cli):
    parser, known = cli.build_parser([])
    text = parser.format_help()
    said = " ".join(text.split())
    assert "one process per GPU under torchrun" in said and "Use the Train TriLoRA node in a graph" in said
    for node_id in ("TriLoRASampleImages", "TriLoRAEncodeDataset", "TrainTriLoRA", "SaveTriLoRA"):
        inputs = comfy_host.nodes.NODE_CLASS_MAPPINGS[node_id].INPUT_TYPES()
        for name, spec in {**inputs["required"], **inputs.get("optional", {})}.items():
            if spec[0] in ("MODEL", "LATENT", "CONDITIONING", "TRILORA", "IMAGE", "VAE", "CLIP") or \
                    spec[1].get("forceInput"):
                assert name not in known or known[name] in cli.OWN  # links are no options; --clip/--vae name files
                continue
            assert f"--{name} " in text
            assert known[name].help().startswith(spec[1]["tooltip"])
            assert f"(default: {spec[1]['default']!r})" in known[name].help() or name == "existing_lora"
    values = _parse(cli, "--checkpoint", TINY)
    train_inputs = comfy_host.nodes.NODE_CLASS_MAPPINGS["TrainTriLoRA"].INPUT_TYPES()
    assert values["learning_rate"] == train_inputs["required"]["learning_rate"][1]["default"]
    assert values["existing_lora"] == "[None]" and values["size"] == 512 and values["filename_prefix"]
    assert (values["resize"], values["upscale"], values["cache"]) == ("aspect buckets", False, "")


def test_config_file_then_flags(cli, tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('checkpoint = "x.safetensors"\nsteps = 7\n[training]\nrank = 16\noptimizer = "SGD"\n'
                    'gradient_checkpointing = false\n')
    values = _parse(cli, "--config", str(path), "--rank", "32", "--gradient_checkpointing", "yes")
    assert (values["steps"], values["rank"], values["optimizer"], values["gradient_checkpointing"]) == (7, 32, "SGD", True)


@pytest.mark.parametrize(("text", "flags", "message"), [
    ('stpes = 3', [], "unknown option 'stpes'"),
    ('rank = 0', [], "rank = 0: outside 1..512"),
    ('steps = "many"', [], "steps = 'many': not an integer"),
    ('learning_rate = true', [], "learning_rate = True: not a number"),
    ('optimizer = "Lion"', [], "optimizer = 'Lion': not one of AdamW, Adam, SGD, RMSprop"),
    ('steps = 3\n[train]\nsteps = 4', [], "steps is given twice"),
    ('steps = [', [], "not valid TOML"),
    ('', ["--gradient_checkpointing", "maybe"], "gradient_checkpointing = 'maybe': not true or false"),
])
def test_bad_options_name_the_option(cli, tmp_path, text, flags, message):
    path = tmp_path / "run.toml"
    path.write_text(f'checkpoint = "{TINY}"\n{text}\n')
    with pytest.raises(cli.ConfigError, match=re.escape(message)):
        _parse(cli, "--config", str(path), *flags)


def test_checks_before_loading_anything(cli, comfy_host, tmp_path):
    with pytest.raises(cli.ConfigError, match="checkpoint 'nothing.safetensors': no such file"):
        cli.setup_folders(_parse(cli, "--checkpoint", "nothing.safetensors"))
    with pytest.raises(cli.ConfigError, match="folder '/nonexistent/images': .*folder not found"):
        cli.setup_folders(_parse(cli, "--checkpoint", TINY, "--folder", "/nonexistent/images"))
    (tmp_path / "captions.txt").write_text("no image beside it")
    with pytest.raises(cli.ConfigError, match="no images"):
        cli.setup_folders(_parse(cli, "--checkpoint", TINY, "--folder", str(tmp_path)))
    Image.new("RGB", (300, 40)).save(tmp_path / "thin.png")  # under the smallest bucket, without upscale
    with pytest.raises(cli.ConfigError, match=r"thin\.png: a picture of 300 x 40 px is smaller than the smallest bucket"):
        cli.setup_folders(_parse(cli, "--checkpoint", TINY, "--folder", str(tmp_path)))
    cli.setup_folders(_parse(cli, "--checkpoint", TINY, "--folder", str(tmp_path), "--upscale", "true"))
    values = _parse(cli, "--checkpoint", TINY, "--batch_size", "3")
    assert cli.train_args(values, ranks=4).batch_size == 12  # the global batch
    with pytest.raises(cli.ConfigError, match="existing_lora: 'gone.safetensors' is not in the loras folder"):
        cli.train_args({**values, "existing_lora": "gone.safetensors"}, ranks=1)
    with pytest.raises(cli.ConfigError, match="SaveTriLoRA: filename_prefix '../up' leaves the loras folder"):
        cli.train_args({**values, "filename_prefix": "../up"}, ranks=1)
