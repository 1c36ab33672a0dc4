"""The command-line trainer (train_trilora.py at the pack's root starts ComfyUI and calls `main`):
a folder of images and captions, encoded as the graph does it, trained by TrainTriLoRA's own
trainer, saved as Save TriLoRA saves; one process, or one per device under torchrun
(training/distributed.py).

Every option but a few is an input of a node, read from that node's definition (name, type,
default, range, choices; its tooltip is the help): Load Training Images (TriLoRA) and Encode
Training Dataset (TriLoRA) for the data, Train TriLoRA for the run, Save TriLoRA for the file. The
CLI adds what to train on (a `checkpoint`, or `unet` + `clip` + `vae` files: cli_models.py),
`loras_dir` (where files go) and `log_dir` (the run's curves: run_log.py), and `batch_size`
counts per rank, as accelerate's does. Base drift is measured on the empty prompt, encoded with the
model's text encoder.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
import traceback

import comfy.model_management
import comfy.utils
import folder_paths
import torch
import torch.distributed as dist

import nodes as comfy_nodes  # ComfyUI's nodes.py (ComfyUI's root is on sys.path)

from ..trilora_core import TriLoRAFile, text_digest
from . import cli_models, curves_plot
from .dataset import TriLoRASampleImages, check_picture, image_files, resolve_folder
from .dataset_cache import cache_path
from .dataset_cache import encode_dataset as encode_items
from .dataset_encode import TriLoRAEncodeDataset
from .loras_folder import NONE_FILE, prefix_location
from .run_log import RunLog
from .save import SaveTriLoRA
from .train import TrainTriLoRA
from .training import (
    TrainArgs,
    TrainingDivergedError,
    TrainingOutOfMemoryError,
    split_conditioning,
    split_latents,
    train,
)
from .training.distributed import STOP, DataParallel, RankFailedError, RanksLostError, StopRequested, world

try:
    import tomllib
except ImportError:  # Python 3.10: the same parser, as a package (pip install tomli)
    tomllib = None

log = logging.getLogger("comfyui-trilora")

PROG = "train_trilora.py"
NODES = (("data (Load Training Images (TriLoRA))", TriLoRASampleImages),
         ("encoding (Encode Training Dataset (TriLoRA))", TriLoRAEncodeDataset),
         ("training (Train TriLoRA)", TrainTriLoRA),
         ("file (Save TriLoRA)", SaveTriLoRA))
WIDGETS = ("INT", "FLOAT", "BOOLEAN", "STRING", "COMBO")  # inputs set by value, not by a link
CLI_NOTES = {"batch_size": " Per rank: under torchrun the global batch is batch_size x ranks, and a run with "
                           "batch_size x ranks on one process is the same run.",
             "cache": " Under torchrun rank 0 encodes and writes it, the other ranks read it (with no name, through a "
                      "file of the run in ComfyUI's temp folder, deleted once read)."}
DESCRIPTION = """\
Trains a TriLoRA with the Train TriLoRA node's own trainer, without the ComfyUI window:
one process, or one process per GPU under torchrun (data parallel, as DDP: every rank takes
its share of each batch, gradients are all-reduced over NCCL, or gloo on the CPU).

Use it for runs that outgrow one GPU or the graph: many images, large models at high
resolution, runs on a server or in a queue, several runs to compare. Use the Train TriLoRA
node in a graph to train where you generate, on one GPU, and to try the result at once.
Both give the same file for the same options.

Options: a TOML file (--config) sets any of them by name; flags override it. Their defaults
and ranges are the nodes' own."""
EPILOG = """\
examples:
  python train_trilora.py --config run.toml
  torchrun --nproc_per_node 4 train_trilora.py --config run.toml --batch_size 2
run.toml:
  checkpoint = "sd_xl_base_1.0.safetensors"   # in ComfyUI's checkpoints folder, or a path
  # or separate files (Flux, SD3.5, Wan...):  unet = "flux1-dev.safetensors"
  #   clip = "clip_l.safetensors, t5xxl_fp16.safetensors"  clip_type = "flux"  vae = "ae.safetensors"
  #   weight_dtype = "fp8_e4m3fn"               # a float8 base, as Load Diffusion Model's
  folder = "/data/my_style"                   # images with .txt captions
  size = 1024
  steps = 2000
  checkpoint_every = 250
  filename_prefix = "trilora/my_style"
"""


METAVARS = {"INT": "N", "FLOAT": "X", "BOOLEAN": "true|false", "STRING": "TEXT", "COMBO": "CHOICE"}
KIND_NAMES = {"INT": "an integer", "FLOAT": "a number", "BOOLEAN": "true or false", "STRING": "a string",
              "COMBO": "a string"}
# Errors whose message says all (the pack's own checks and endings): no traceback for them.
EXPLAINED = (ValueError, RankFailedError, RanksLostError, StopRequested, TrainingDivergedError,
             TrainingOutOfMemoryError)


class ConfigError(ValueError):
    """A bad option: the same on every rank, so rank 0 alone reports it."""


def _boolean(value) -> bool:
    if isinstance(value, str):
        value = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[value.lower()]
    if not isinstance(value, bool):
        raise ValueError
    return value


def _integer(value) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError
    return int(value)


def _number(value) -> float:
    if isinstance(value, bool):
        raise ValueError
    return float(value)


def _string(value) -> str:
    if not isinstance(value, str):
        raise ValueError
    return value


# A config file's or command line's value -> the node's; ValueError, KeyError or TypeError when it is not one.
_CONVERTERS = {"BOOLEAN": _boolean, "INT": _integer, "FLOAT": _number}


@dataclasses.dataclass
class Option:
    name: str
    kind: str  # the ComfyUI type: INT, FLOAT, BOOLEAN, STRING, COMBO
    spec: dict  # the node's widget options: default, min, max, options, tooltip

    def parse(self, value):
        """The value as the node takes it; raises ConfigError naming the option."""
        spec, where = self.spec, f"{self.name} = {value!r}"
        try:
            value = _CONVERTERS.get(self.kind, _string)(value)
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"{where}: not {KIND_NAMES[self.kind]}") from None
        if "min" in spec and value < spec["min"] or "max" in spec and value > spec["max"]:
            raise ConfigError(f"{where}: outside {spec['min']}..{spec['max']}")
        if self.kind == "COMBO" and not self.names_a_file() and value not in spec["options"]:
            raise ConfigError(f"{where}: not one of {', '.join(spec['options'])}")
        return value

    def names_a_file(self) -> bool:
        return NONE_FILE in self.spec.get("options", ())

    def help(self) -> str:
        text = self.spec.get("tooltip", "") + CLI_NOTES.get(self.name, "")
        if self.names_a_file():
            return f"{text} A file name inside the loras folder. (default: {self.spec['default']})"
        if self.kind == "COMBO":
            text += f" One of: {', '.join(self.spec['options'])}."
        if "min" in self.spec:
            text += f" Range {self.spec['min']}..{self.spec['max']}."
        if "default" in self.spec:
            text += f" (default: {self.spec['default']!r})"
        return text.replace("%", "%%")

    def metavar(self) -> str:
        return "FILE" if self.names_a_file() else METAVARS[self.kind]


OWN = [*cli_models.options(Option),
       Option("loras_dir", "STRING", {"default": "", "tooltip": "The folder for checkpoints, the finished file and "
                                      "existing_lora: empty is ComfyUI's loras folder."}),
       Option("log_dir", "STRING", {"default": "", "tooltip": "The folder for the run's log (log.jsonl: the loss "
                                    "per step, held-out error and drift per evaluation; TensorBoard event files "
                                    "when tensorboard is installed) and its curves picture: empty is "
                                    "trilora_logs/<start time> in ComfyUI's output folder."})]


def node_options() -> list[tuple[str, list[Option]]]:
    """(group title, options) per node, in the node's input order."""
    groups = []
    for title, node in NODES:
        inputs = node.INPUT_TYPES()
        specs = {**inputs.get("required", {}), **inputs.get("optional", {})}
        groups.append((title, [Option(name, kind, dict(spec[1] if len(spec) > 1 else {}))
                               for name, spec in specs.items()
                               if (kind := spec[0]) in WIDGETS and not (spec[1:] and spec[1].get("forceInput"))]))
    return groups


def build_parser(parents) -> tuple[argparse.ArgumentParser, dict[str, Option]]:
    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION, epilog=EPILOG, parents=parents,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", metavar="RUN.toml", help="A TOML file with any of the options below, by name "
                        "(tables are allowed and only group them).")
    known = {}
    for title, options in [("model and files", OWN), *node_options()]:
        group = parser.add_argument_group(title)
        for option in options:
            group.add_argument(f"--{option.name}", metavar=option.metavar(), help=option.help())
            known[option.name] = option
    return parser, known


def read_config(path: str) -> dict:
    toml = tomllib
    if toml is None:
        try:
            import tomli as toml
        except ImportError:
            raise ConfigError("--config needs Python 3.11 or later, or `pip install tomli` on Python 3.10") from None
    try:
        with open(path, "rb") as f:
            raw = toml.load(f)
    except OSError as err:
        raise ConfigError(f"--config {path}: {err.strerror}") from None
    except toml.TOMLDecodeError as err:
        raise ConfigError(f"--config {path}: not valid TOML: {err}") from None
    values = {}
    for key, value in raw.items():
        for name, item in (value.items() if isinstance(value, dict) else [(key, value)]):
            if name in values:
                raise ConfigError(f"--config {path}: {name} is given twice")
            values[name] = item
    return values


def resolve(ns: argparse.Namespace, known: dict[str, Option]) -> dict:
    """Every option's value: the node's default < the config file < the command line."""
    given = read_config(ns.config) if "config" in ns else {}
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ConfigError(f"--config {ns.config}: unknown option {unknown[0]!r}; see --help for the options")
    given.update({k: v for k, v in vars(ns).items() if k in known})
    values = {}
    for name, option in known.items():
        if name in given:
            values[name] = option.parse(given[name])
        elif "default" in option.spec:
            values[name] = option.spec["default"]
        else:
            raise ConfigError(f"{name} is required (in the config file or as --{name})")
    return values


def setup_folders(values: dict) -> dict:
    """Checks the image folder, registers loras_dir and the model files' folders with ComfyUI;
    returns the model files (cli_models.resolve_files). Raises ConfigError before anything loads."""
    try:  # the dataset node's own rules, so a wrong folder or picture fails before the checkpoint loads
        for path in image_files(resolve_folder(values["folder"])):
            check_picture(path, values["size"], values["resize"], values["upscale"])
    except ValueError as err:
        raise ConfigError(f"folder {values['folder']!r}: {err}") from None
    if values["loras_dir"]:
        os.makedirs(values["loras_dir"], exist_ok=True)
        folder_paths.add_model_folder_path("loras", os.path.abspath(values["loras_dir"]), is_default=True)
    return cli_models.resolve_files(values, ConfigError)


def train_args(values: dict, ranks: int) -> TrainArgs:
    """TrainTriLoRA's arguments, checked by the node's own rules; the batch is the global one."""
    names = [f.name for f in dataclasses.fields(TrainArgs)]
    args = TrainArgs(**{n: values[n] for n in names if n in values})  # each field is a node input
    args.batch_size *= ranks
    try:
        args.check()
        found = TrainTriLoRA.validate_inputs(existing_lora=args.existing_lora)
        if found is not True:
            raise ValueError(f"TrainTriLoRA: existing_lora: {found}")
        prefix_location(values["filename_prefix"], "SaveTriLoRA")
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return args


def dataset_cache(values: dict, ranks: int) -> tuple[str | None, bool]:
    """(the cache file, whether it is the run's own): the one named; with several ranks and no
    name, a file of this run in ComfyUI's temp folder, which rank 0 deletes once every rank read it."""
    name = values["cache"].strip()
    if name:
        return cache_path(name), False
    if ranks == 1:
        return None, False
    models = [values[k] for k in ("checkpoint", "unet", "weight_dtype", "clip", "clip_type", "vae")]
    what = [os.path.abspath(str(resolve_folder(values["folder"]))), values["size"], values["resize"],
            values["upscale"], models, os.environ.get("TORCHELASTIC_RUN_ID", "")]
    return os.path.join(folder_paths.get_temp_directory(), f"trilora_dataset_{text_digest(repr(what))[:16]}.safetensors"), True


def encode_dataset(values: dict, clip, vae) -> tuple[list, list, list[str]]:
    """(one LATENT, one CONDITIONING, one caption) per image, as the training graph makes them: Load Training
    Images, then Encode Training Dataset (VAE Encode and CLIP Text Encode) with its cache; run
    under inference mode, as ComfyUI's executor does. Under torchrun rank 0 encodes and writes the
    cache, the other ranks wait, then read it (encoding nothing)."""
    rank, ranks = world()
    path, own = dataset_cache(values, ranks)
    with torch.inference_mode():
        images, captions = TriLoRASampleImages.execute(values["folder"], values["size"], values["resize"],
                                                       values["upscale"]).result
        if rank > 0:
            dist.barrier()  # rank 0 has written the cache
        done = encode_items(images, captions, vae, clip, path, encode=rank == 0)
        if rank == 0 and ranks > 1:
            dist.barrier()
        if own:
            dist.barrier()  # every rank has read it
            if rank == 0:
                os.remove(path)
    if path is not None and not own:
        done.log_cache(path)
    return done.latents, done.conditioning, captions


def start_ranks() -> None:
    """Joins torchrun's process group (its environment names the rank and the rendezvous):
    NCCL where ComfyUI runs on CUDA, else gloo."""
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        device = comfy.model_management.get_torch_device()
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def run(values: dict) -> str:
    """Trains and (on rank 0) saves; returns the saved file's name (rank 0) or ""."""
    rank, ranks = world()
    files = setup_folders(values)
    args = train_args(values, ranks)
    with torch.inference_mode():
        model, clip, vae = cli_models.load(values, files)
    latents, positive, captions = encode_dataset(values, clip, vae)
    with torch.inference_mode():
        empty = comfy_nodes.CLIPTextEncode().encode(clip, "")[0]  # the preservation prompt of base drift
    if not args.encodes_captions:  # else the run encodes the captions at every step with it
        clip = captions = None
    images, sources = split_latents(latents)
    entries, image_conds = split_conditioning(positive, len(images), sources)
    if args.batch_size > len(images):
        log.warning("TriLoRA: the global batch (%d) is larger than the %d images; each step takes all of them",
                    args.batch_size, len(images))
    run_log = RunLog(log_folder(values), lambda latent: decode_preview(vae, latent)) if rank == 0 else None
    try:
        with torch.inference_mode(False), torch.enable_grad():
            parallel = DataParallel()
            trainer = train(args, model, images, entries, image_conds, parallel=parallel,
                            listeners=[run_log] if run_log else (), preservation=[empty], clip=clip,
                            captions=captions)
            trilora = TriLoRAFile(trainer.layers(), trainer.metadata(trainer.total))
    finally:
        if run_log is not None:
            run_log.close()
    if rank != 0:
        return ""
    show_curves(trainer, run_log.folder)
    STOP.ending = True  # a stop signal now would only lose the finished file
    name = SaveTriLoRA.execute(trilora, values["filename_prefix"]).result[0]
    ends = parallel.step_ends
    if len(ends) > 1:  # the first step's allocations and warm-up left out
        (wall0, cpu0), (wall1, cpu1) = ends[0], ends[-1]
        per_second = (len(ends) - 1) / (wall1 - wall0)
        log.info("TriLoRA: %d steps on %d rank%s; after the first step %.3f steps/s, %.2f images/s, "
                 "%.3f CPU s/step on rank 0", len(ends), ranks, "s" if ranks > 1 else "", per_second,
                 per_second * min(args.batch_size, len(images)) * args.grad_accumulation_steps,
                 (cpu1 - cpu0) / (len(ends) - 1))
    log.info("TriLoRA saved as %s (%d steps) in %s", name, trainer.total, folder_paths.get_folder_paths("loras")[0])
    return name


def decode_preview(vae, latent: torch.Tensor):
    """A preview latent as a picture (the first frame of a video), with the checkpoint's VAE."""
    from PIL import Image

    with torch.inference_mode():
        pixels = vae.decode(latent)
    frame = pixels.reshape(-1, *pixels.shape[-3:])[0].clamp(0, 1)
    return Image.fromarray((frame.float().cpu().numpy() * 255).round().astype("uint8"))


def log_folder(values: dict) -> str:
    return values["log_dir"] or os.path.join(folder_paths.get_output_directory(), "trilora_logs",
                                             time.strftime("%Y%m%d-%H%M%S"))


def show_curves(trainer, folder: str) -> None:
    """Prints the evaluations and draws the curves (curves.png in the log folder)."""
    loss_map = {"loss": list(trainer.losses), **trainer.monitor.curves()}
    if loss_map["eval_steps"]:
        log.info("TriLoRA evaluations:\n%s", curves_plot.summary(loss_map))
    curves_plot.plot(loss_map, f"Train TriLoRA: {len(trainer.losses)} steps").save(os.path.join(folder, "curves.png"))


def main(argv: list[str], host_options: argparse.ArgumentParser) -> int:
    """Runs the CLI; returns the exit status (0 done, 1 training failed or stopped, 2 bad options)."""
    parser, known = build_parser([host_options])
    ns = parser.parse_args(argv)
    STOP.install()
    rank = 0
    try:
        start_ranks()
        rank, _ = world()
        if rank == 0:
            logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
        else:
            comfy.utils.PROGRESS_BAR_ENABLED = False
        run(resolve(ns, known))
    except ConfigError as err:
        if rank == 0:
            print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except BaseException as err:
        if rank == 0 or not getattr(err, "reported_to_rank0", False):
            cause = err.__cause__ or err
            if not isinstance(err, EXPLAINED) or not isinstance(cause, EXPLAINED):
                traceback.print_exc()  # a fault of the program: where it happened helps
            print(f"{PROG}{f' (rank {rank})' if rank else ''}: error: {err}", file=sys.stderr)
        return 1
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0
