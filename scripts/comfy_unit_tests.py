#!/usr/bin/env python3
"""ComfyUI's own unit tests (tests-unit/ of the host ComfyUI), run twice: once with this pack
loaded into ComfyUI by ComfyUI's own custom-node loader before any test runs, once without. The
pack must change no result of ComfyUI's: the outcome of every test (passed, failed, skipped,
error) must be the same in both runs.

    .venv/bin/python scripts/comfy_unit_tests.py [--comfyui DIR] [--json OUT]

Exit status 0 when both runs agree on every test (and the pack was really loaded), 1 otherwise.
ComfyUI is COMFYUI_DIR, else the .comfyui/ that `make setup` builds; the pack is taken from its
custom_nodes/comfyui-trilora (the link `make setup` makes), as ComfyUI itself would load it.

This file is also the pytest plugin of those runs (`-p comfy_unit_tests`): with
TRILORA_UNIT_MODE=pack it loads the pack before collection; with =baseline it imports the same
ComfyUI modules (nodes.py and what it pulls in) without the pack. In both it records every
test's outcome into TRILORA_UNIT_REPORT.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACK_LINK = "custom_nodes/comfyui-trilora"

# Tests left out of both runs, and why. Everything else in tests-unit runs.
EXCLUDED = {
    "tests-unit/app_test/frontend_manager_test.py::test_init_frontend_invalid_version":
        "needs the network: asks api.github.com for the frontend's releases",
    "tests-unit/app_test/frontend_manager_test.py::test_init_frontend_invalid_provider":
        "needs the network: asks api.github.com for the frontend's releases",
}


# --------------------------------------------------------------------------- the pytest plugin

_outcomes: dict[str, str] = {}
_pack: dict = {}


def pytest_configure(config) -> None:
    mode = os.environ.get("TRILORA_UNIT_MODE")
    if mode not in ("pack", "baseline"):
        return
    import asyncio
    import importlib

    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # as ComfyUI's own tests do when there is no GPU
    # nodes.py puts comfy/ first on sys.path, where comfy/utils.py would then shadow ComfyUI's
    # utils/ package: main.py imports that package before nodes.py, and so does this.
    importlib.import_module("utils")
    import comfy.weight_adapter

    import nodes

    before = set(nodes.NODE_CLASS_MAPPINGS)
    if mode == "pack":
        pack_dir = Path.cwd() / PACK_LINK
        if not pack_dir.is_dir():
            raise RuntimeError(f"{pack_dir} is missing: run `make setup`")
        ok = asyncio.run(nodes.load_custom_node(str(pack_dir)))
        added = sorted(set(nodes.NODE_CLASS_MAPPINGS) - before)
        adapters = [getattr(a, "name", "") for a in comfy.weight_adapter.adapters]
        if not ok or "TriLoRALoader" not in added or "trilora" not in adapters:
            raise RuntimeError(f"the pack did not load: ok={ok}, nodes={added}, adapters={adapters}")
        _pack.update(loaded=True, nodes=added, adapters=adapters)
    else:
        _pack.update(loaded=False, nodes=[], adapters=[getattr(a, "name", "") for a in comfy.weight_adapter.adapters])


def pytest_runtest_logreport(report) -> None:
    if not os.environ.get("TRILORA_UNIT_MODE"):
        return
    if report.when == "call":
        outcome = "xfailed" if hasattr(report, "wasxfail") and report.skipped else report.outcome
    elif report.failed:
        outcome = "error"  # setup or teardown failed
    elif report.skipped:  # skipped in setup (skip marks, skipif)
        outcome = "skipped"
    else:
        return
    if _outcomes.get(report.nodeid) != "error":
        _outcomes[report.nodeid] = outcome


def pytest_sessionfinish(session, exitstatus) -> None:
    path = os.environ.get("TRILORA_UNIT_REPORT")
    if path and os.environ.get("TRILORA_UNIT_MODE"):
        Path(path).write_text(json.dumps({"pack": _pack, "outcomes": _outcomes, "exitstatus": int(exitstatus)}))


# --------------------------------------------------------------------------- the two runs


def run_tests(comfy: Path, mode: str, report: Path) -> dict:
    env = {**os.environ, "TRILORA_UNIT_MODE": mode, "TRILORA_UNIT_REPORT": str(report),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "pytest", "tests-unit", "-p", "comfy_unit_tests", "-p", "no:cacheprovider",
               "-q", "-o", "asyncio_default_fixture_loop_scope=function",
               *(f"--deselect={test}" for test in EXCLUDED)]
    start = time.monotonic()
    proc = subprocess.run(command, cwd=comfy, env=env, capture_output=True, text=True, timeout=600)
    seconds = time.monotonic() - start
    if not report.is_file():
        raise RuntimeError(f"the {mode} run recorded nothing (exit {proc.returncode}):\n{proc.stdout[-3000:]}"
                           f"\n{proc.stderr[-3000:]}")
    result = json.loads(report.read_text())
    result.update(seconds=round(seconds, 1), tail=proc.stdout.strip().splitlines()[-1:])
    return result


def summary(outcomes: dict[str, str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for outcome in outcomes.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    return dict(sorted(counts.items()))


def compare(comfy: Path, workdir: Path) -> dict:
    runs = {mode: run_tests(comfy, mode, workdir / f"tests-unit-{mode}.json") for mode in ("baseline", "pack")}
    base, pack = runs["baseline"]["outcomes"], runs["pack"]["outcomes"]
    differences = {test: {"baseline": base.get(test, "not run"), "pack": pack.get(test, "not run")}
                   for test in sorted(set(base) | set(pack)) if base.get(test) != pack.get(test)}
    return {
        "comfyui": str(comfy),
        "identical": not differences and runs["pack"]["pack"].get("loaded") is True,
        "differences": differences,
        "tests": len(base),
        "baseline": summary(base),
        "pack": summary(pack),
        "pack_loaded": runs["pack"]["pack"],
        "excluded": EXCLUDED,
        "not_passed": {t: o for t, o in sorted(base.items()) if o != "passed"},
        "seconds": {mode: run["seconds"] for mode, run in runs.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", type=Path, default=Path(os.environ.get("COMFYUI_DIR") or REPO / ".comfyui"))
    parser.add_argument("--json", type=Path, help="write the comparison here as JSON")
    args = parser.parse_args(argv)
    comfy = args.comfyui.resolve()
    if not (comfy / "tests-unit").is_dir():
        print(f"{comfy} has no tests-unit/ folder", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        result = compare(comfy, Path(tmp))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print(f"ComfyUI tests-unit in {comfy}: {result['tests']} tests, {len(EXCLUDED)} excluded")
    print(f"  without the pack: {result['baseline']} in {result['seconds']['baseline']} s")
    print(f"  with the pack:    {result['pack']} in {result['seconds']['pack']} s "
          f"(nodes added: {len(result['pack_loaded'].get('nodes', []))})")
    for test, reason in EXCLUDED.items():
        print(f"  excluded: {test}: {reason}")
    for test, outcome in result["not_passed"].items():
        if test not in result["differences"]:
            print(f"  {outcome} in both runs: {test}")
    if result["differences"]:
        print("DIFFERENT OUTCOMES with the pack loaded:")
        for test, outcomes in result["differences"].items():
            print(f"  {test}: without {outcomes['baseline']}, with {outcomes['pack']}")
    print("identical" if result["identical"] else "NOT identical")
    return 0 if result["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
