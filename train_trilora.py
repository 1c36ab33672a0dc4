#!/usr/bin/env python
"""Trains a TriLoRA without the ComfyUI window: one process, or one per GPU under torchrun.

    python custom_nodes/comfyui-trilora/train_trilora.py --config run.toml
    torchrun --nproc_per_node 4 custom_nodes/comfyui-trilora/train_trilora.py --config run.toml

A script file, as kohya's train_network.py is, because the pack is no importable package on its
own: its folder is named comfyui-trilora and its modules import each other relatively, which
works once ComfyUI's custom-node loader has imported it. So this script boots ComfyUI as a library
(the ComfyUI around the pack's folder, or --comfyui / COMFYUI_DIR), loads the pack with ComfyUI's
own loader, and hands over to nodes/train_cli.py. `--help` lists every option.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import warnings
from pathlib import Path

PACK = Path(os.path.abspath(__file__)).parent  # not resolved: the pack may be a link in custom_nodes/


def host_options() -> argparse.ArgumentParser:
    """The options that are needed before ComfyUI starts; train_cli.py shows them in --help too."""
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("where it runs")
    group.add_argument("--comfyui", metavar="DIR",
                       help="The ComfyUI folder to run (default: $COMFYUI_DIR, else the ComfyUI whose custom_nodes "
                            "folder holds this pack, else the pack's .comfyui/ made by `make setup`).")
    group.add_argument("--cpu", action="store_true",
                       help="Train on the CPU even where there is a GPU (ComfyUI's --cpu; ranks talk over gloo).")
    return parser


def find_comfyui(given: str | None) -> Path:
    candidates = [given] if given else [os.environ.get("COMFYUI_DIR"), PACK.parent.parent, PACK / ".comfyui"]
    for candidate in filter(None, candidates):
        if (Path(candidate) / "comfy" / "model_management.py").is_file():
            return Path(candidate).resolve()
    raise SystemExit(f"train_trilora: no ComfyUI found (looked in {', '.join(map(str, filter(None, candidates)))}); "
                     "give its folder with --comfyui DIR or COMFYUI_DIR")


def import_comfyui(comfy_dir: Path, cpu: bool):
    """Imports ComfyUI from ``comfy_dir`` as its main.py starts, on the CPU or this rank's GPU: its
    command line, its modules first on sys.path, utils before nodes, its extra_model_paths.yaml.
    Returns ComfyUI's nodes module. Call it before anything imports a ComfyUI module: ComfyUI reads
    its command line at the first import. The dev harness (harness/host.py) boots through here too."""
    import torch

    cuda = torch.cuda.is_available() and not cpu
    if cuda:  # ComfyUI takes the current device as its own; torchrun gives each rank its LOCAL_RANK
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    own_argv = sys.argv
    sys.argv = [own_argv[0]] + ([] if cuda else ["--cpu"])  # ComfyUI parses its command line at import
    # ComfyUI's modules first: the pack's own folder (the script's) has a `nodes` package too.
    sys.path[:] = [str(comfy_dir)] + [p for p in sys.path if Path(p or ".").resolve() != PACK.resolve()]
    import comfy.options

    comfy.options.enable_args_parsing()
    import utils.extra_config  # before nodes, as main.py does: comfy/ then joins sys.path, with a utils.py

    import nodes

    sys.argv = own_argv
    extra_paths = comfy_dir / "extra_model_paths.yaml"  # as ComfyUI's main.py reads it
    if extra_paths.is_file():
        utils.extra_config.load_extra_path_config(str(extra_paths))
    return nodes


def load_pack(pack_dir: Path):
    """Loads the pack from ``pack_dir`` with ComfyUI's own custom-node loader; returns the pack's
    module, or None where the loader reported an import error (ComfyUI logs its traceback)."""
    import nodes

    if not asyncio.run(nodes.load_custom_node(str(pack_dir))):
        return None
    return next(m for m in list(sys.modules.values()) if getattr(m, "__file__", None) == str(pack_dir / "__init__.py"))


def main() -> int:
    host, _ = host_options().parse_known_args()
    if int(os.environ.get("RANK", "0")) != 0:  # only rank 0 logs; the others report only their own failure
        logging.disable(logging.CRITICAL)
        warnings.simplefilter("ignore")
    import_comfyui(find_comfyui(host.comfyui), host.cpu)
    pack = load_pack(PACK)
    if pack is None:
        raise SystemExit(f"train_trilora: ComfyUI could not load the pack from {PACK} (see its log above)")
    from importlib import import_module

    return import_module(pack.__name__ + ".nodes.train_cli").main(sys.argv[1:], host_options())


if __name__ == "__main__":
    sys.exit(main())
