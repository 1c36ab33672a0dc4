"""A real ComfyUI server on 127.0.0.1 with the pack installed, started once per session.

Its loras folder is a temporary one (added through --extra-model-paths-config), so the tests
can drop files there without touching the host's folders."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[2]
COMFY = Path(os.environ.get("COMFYUI_DIR") or REPO / ".comfyui").resolve()
TINY = "trilora-tiny-sd15.safetensors"
sys.path.insert(0, str(REPO))  # trilora_core, to write test files; the server imports the pack itself


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server(SimpleNamespace):
    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict):
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise AssertionError(f"{path} answered {e.code}: {e.read().decode()}") from e

    def run_prompt(self, prompt: dict, timeout: float = 300) -> dict:
        """Queues an API-format prompt and waits for its history entry."""
        prompt_id = self.post("/prompt", {"prompt": prompt})["prompt_id"]
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                entry = history[prompt_id]
                if entry["status"]["status_str"] in ("success", "error"):
                    return entry
            time.sleep(0.25)
        raise AssertionError(f"prompt {prompt_id} did not finish in {timeout} s; server log:\n{self.log_tail()}")

    def log_tail(self, n: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]


def start_server(root: Path) -> Server:
    """A ComfyUI server whose loras, output, user and temp folders are under ``root``."""
    loras, output = root / "loras", root / "output"
    loras.mkdir()
    output.mkdir()
    (root / "user").mkdir()
    config = root / "extra_model_paths.yaml"
    # is_default: files the graphs save (SaveTriLoRA) land here too, not in the host's loras folder
    config.write_text(f"trilora_tests:\n  base_path: {root}\n  is_default: true\n  loras: loras\n")
    port = free_port()
    log_path = root / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
             "--output-directory", str(output), "--extra-model-paths-config", str(config),
             "--user-directory", str(root / "user"), "--temp-directory", str(root),
             "--disable-auto-launch"],
            cwd=COMFY, stdout=log, stderr=subprocess.STDOUT)
    srv = Server(url=f"http://127.0.0.1:{port}", proc=proc, loras=loras, output=output, log_path=log_path)
    deadline = time.time() + 180
    while True:
        try:
            srv.get("/object_info/CheckpointLoaderSimple")
            return srv
        except (urllib.error.URLError, ConnectionError, OSError):
            if proc.poll() is not None or time.time() > deadline:
                stop_server(srv)
                raise RuntimeError(f"ComfyUI did not start:\n{srv.log_tail()}") from None
            time.sleep(0.5)


def stop_server(srv: Server) -> None:
    srv.proc.terminate()
    try:
        srv.proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        srv.proc.kill()


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("server"))
    yield srv
    stop_server(srv)


ARTIFACTS = REPO / "test_artifacts"  # screenshots of the browser tests (git-ignored)


@pytest.fixture(scope="session")
def browser(server):
    """The server's own frontend in headless Chromium (scripts/comfy_browser.py), opened once."""
    sys.path.insert(0, str(REPO / "scripts"))
    from comfy_browser import ComfyBrowser

    with ComfyBrowser(server.url) as b:
        yield b
