"""The pack as the Comfy Registry takes it: `comfy node validate` (comfy-cli, the Registry's own
check) passes without the network, and pyproject.toml, the icon and the publish workflow say what
the Registry's docs ask for (https://docs.comfy.org/registry/specifications, .../publishing)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import tomllib
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def test_comfy_node_validate_passes_offline(tmp_path):
    comfy = Path(sys.executable).parent / "comfy"  # comfy-cli, a dev requirement
    command = [str(comfy), "--skip-prompt", "--no-enable-telemetry", "node", "validate"]
    if shutil.which("unshare") and subprocess.run(["unshare", "-rn", "true"], capture_output=True).returncode == 0:
        command = ["unshare", "-rn", *command]  # no network, where the system lets us take it away
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path)}  # its config stays here
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # It exits 0 on security findings too (exec/eval, several statements on a line): none allowed.
    assert "All validation checks passed" in output and "warnings" not in output, output


def test_pyproject_has_the_registry_fields():
    project, comfy = PYPROJECT["project"], PYPROJECT["tool"]["comfy"]
    assert re.fullmatch(r"[a-z][a-z0-9]*(?:[-_.][a-z0-9]+)*", project["name"]) and len(project["name"]) < 100
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])  # semantic version X.Y.Z
    assert project["license"] == {"file": "LICENSE"} and (REPO / "LICENSE").is_file()
    assert comfy["PublisherId"] and comfy["DisplayName"] == "TriLoRA"
    assert re.fullmatch(r">=\d+\.\d+\.\d+", comfy["requires-comfyui"])
    # no torch: ComfyUI owns it, and a node that reinstalls it breaks users' installs
    assert not [d for d in project["dependencies"] if re.match(r"torch\b", d)]


def test_the_icon_is_in_the_repository_where_its_url_points():
    repository = PYPROJECT["project"]["urls"]["Repository"]
    owner_name = repository.removeprefix("https://github.com/")
    prefix = f"https://raw.githubusercontent.com/{owner_name}/main/"
    icon = PYPROJECT["tool"]["comfy"]["Icon"]
    assert icon.startswith(prefix)
    path = REPO / icon.removeprefix(prefix)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width == image.height <= 400
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "make_icon.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert subprocess.run(["git", "ls-files", "--error-unmatch", str(path)], cwd=REPO,
                          capture_output=True).returncode == 0  # committed, so the URL serves it


def test_the_publish_workflow_runs_comfys_action_when_the_version_changes():
    workflow = yaml.safe_load((REPO / ".github" / "workflows" / "publish.yml").read_text(encoding="utf-8"))
    trigger = workflow[True]  # YAML 1.1 reads the key `on` as True
    assert trigger["push"] == {"branches": ["main"], "paths": ["pyproject.toml"]} and "workflow_dispatch" in trigger
    steps = workflow["jobs"]["publish-node"]["steps"]
    publish = next(s for s in steps if s.get("uses", "").startswith("Comfy-Org/publish-node-action@"))
    assert publish["with"] == {"personal_access_token": "${{ secrets.REGISTRY_ACCESS_TOKEN }}"}
    assert "steps.version.outputs.changed == 'true'" in publish["if"]
