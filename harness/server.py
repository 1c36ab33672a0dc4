"""A ComfyUI server on 127.0.0.1 as a subprocess, and a small client for it (/prompt, /history,
/view, the websocket's progress messages): what the end-to-end tests, `make demo` and
scripts/make_workflows.py run graphs through.

The server is ComfyUI's own main.py from the host (harness.COMFY by default), so it loads the pack
from custom_nodes/ exactly as a user's ComfyUI does. `start_server` gives it temporary loras,
output, user and temp folders, so tests leave the host's own folders clean.
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

from . import COMFY


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyError(RuntimeError):
    """The server did not start, refused a request, or a prompt did not finish in time."""


class ComfyServer:
    """A ComfyUI server on 127.0.0.1: started here (`start`) or already running (`url`)."""

    def __init__(self, url: str, proc: subprocess.Popen | None = None, log_path: Path | None = None):
        self.url = url.rstrip("/")
        self.proc = proc
        self.log_path = log_path
        self.client_id = uuid.uuid4().hex
        self.loras: Path | None = None   # set by start_server: its first loras folder
        self.output: Path | None = None  # and its output folder

    @classmethod
    def start(cls, comfy_dir: Path, output_dir: Path, user_dir: Path, log_path: Path, *,
              extra_model_paths: Path | None = None, python: str = sys.executable, cpu: bool | None = None,
              timeout: float = 180) -> ComfyServer:
        """Starts ComfyUI's main.py from ``comfy_dir`` with ``python``; on the CPU when ``cpu``, or
        (None) where that python's torch sees no CUDA. Raises ComfyError with the log's tail if it
        does not answer within ``timeout`` seconds."""
        port = free_port()
        # Its own temp directory: ComfyUI empties its temp folder when it starts and stops, and the
        # previews (loss graph, Preview Image) live there until fetched.
        cmd = [python, "main.py", "--listen", "127.0.0.1", "--port", str(port), "--output-directory",
               str(output_dir), "--user-directory", str(user_dir), "--temp-directory", str(user_dir),
               "--disable-auto-launch"]
        if cpu or (cpu is None and not _cuda_available(python)):
            cmd.append("--cpu")
        if extra_model_paths:
            cmd += ["--extra-model-paths-config", str(extra_model_paths)]
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, cwd=comfy_dir, stdout=log, stderr=subprocess.STDOUT)
        server = cls(f"http://127.0.0.1:{port}", proc, log_path)
        deadline = time.time() + timeout
        while True:
            try:
                server.get("/object_info/CheckpointLoaderSimple")
                return server
            except (urllib.error.URLError, ConnectionError, OSError):
                if proc.poll() is not None or time.time() > deadline:
                    server.stop()
                    raise ComfyError(f"ComfyUI did not start; its log:\n{server.log_tail()}") from None
                time.sleep(0.5)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_tail(self, n: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path else ""

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def get_bytes(self, path: str) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return r.read()

    def post(self, path: str, body: dict):
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                data = r.read()
                return json.loads(data) if data else None
        except urllib.error.HTTPError as e:
            raise ComfyError(f"{path} answered {e.code}: {e.read().decode(errors='replace')}") from e

    def queue(self, prompt: dict, workflow: dict | None = None) -> str:
        """Queues an API prompt (with its UI workflow, so saved images carry it); its id."""
        body = {"prompt": prompt, "client_id": self.client_id}
        if workflow is not None:
            body["extra_data"] = {"extra_pnginfo": {"workflow": workflow}}
        return self.post("/prompt", body)["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600,
             on_progress: Callable[[dict], None] | None = None) -> dict:
        """Polls /history until the prompt is done; its history entry. With `on_progress`, also
        listens on the server's websocket and calls it about twice a second with what runs now:
        {"node": id or None, "value": int, "max": int, "text": str, "previews": int}: the running
        node's progress bar (e.g. training steps), the text it shows under itself (e.g. the loss)
        and how many preview images the websocket has brought so far."""
        listener = _ProgressListener(self) if on_progress else None
        deadline = time.time() + timeout
        try:
            while time.time() < deadline:
                entry = self.get(f"/history/{urllib.parse.quote(prompt_id)}").get(prompt_id)
                if entry and entry.get("status", {}).get("completed") is not None \
                        and entry["status"].get("status_str") in ("success", "error"):
                    return entry
                if listener:
                    on_progress(dict(listener.state))
                time.sleep(0.5)
        finally:
            if listener:
                listener.stop()
                on_progress(dict(listener.state))  # the last word: what came before the prompt finished
        raise ComfyError(f"prompt {prompt_id} did not finish in {timeout} s; server log:\n{self.log_tail()}")

    def run(self, prompt: dict, workflow: dict | None = None, timeout: float = 600,
            on_progress: Callable[[dict], None] | None = None) -> dict:
        return self.wait(self.queue(prompt, workflow), timeout, on_progress)

    def file(self, entry: dict) -> bytes:
        """The bytes of an output entry ({"filename", "subfolder", "type"}) through /view."""
        query = urllib.parse.urlencode({k: entry.get(k, "") for k in ("filename", "subfolder", "type")})
        return self.get_bytes("/view?" + query)


class _ProgressListener:
    """The server's websocket for our client id, read in a thread: progress messages go only to
    the client that queued the prompt."""

    def __init__(self, server: ComfyServer):
        import threading

        self.state = {"node": None, "value": 0, "max": 0, "text": "", "previews": 0}
        self._stop = threading.Event()
        self._url = server.url.replace("http://", "ws://") + f"/ws?clientId={server.client_id}"
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import asyncio

        try:
            asyncio.run(self._listen())
        except Exception:  # progress is a nicety: polling /history still finishes the job
            pass

    async def _listen(self) -> None:
        import aiohttp

        async with aiohttp.ClientSession() as session, session.ws_connect(self._url, heartbeat=20) as ws:
            while not self._stop.is_set():
                try:
                    msg = await ws.receive(timeout=0.5)
                except TimeoutError:
                    continue
                if msg.type == aiohttp.WSMsgType.BINARY:
                    self._binary(msg.data)
                    continue
                if msg.type != aiohttp.WSMsgType.TEXT:
                    if msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                        return
                    continue
                data = json.loads(msg.data)
                kind, body = data.get("type"), data.get("data") or {}
                if kind == "executing":
                    self.state.update(node=body.get("node"), value=0, max=0, text="")
                elif kind == "progress":
                    self.state.update(node=body.get("node"), value=body.get("value", 0), max=body.get("max", 0))

    def _binary(self, data: bytes) -> None:
        """Progress text a node shows under itself (type 3: node id length, node id, text), and
        preview images (type 1: format and image; type 4: with metadata)."""
        import struct

        if len(data) >= 4 and struct.unpack(">I", data[:4])[0] in (1, 4):
            self.state["previews"] += 1
        if len(data) >= 8 and struct.unpack(">I", data[:4])[0] == 3:
            size = struct.unpack(">I", data[4:8])[0]
            self.state.update(node=data[8:8 + size].decode(errors="replace"),
                              text=data[8 + size:].decode(errors="replace"))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _cuda_available(python: str) -> bool:
    try:
        out = subprocess.run([python, "-c", "import torch; print(torch.cuda.is_available())"],
                             capture_output=True, text=True, timeout=120)
        return out.stdout.strip() == "True"
    except (OSError, subprocess.TimeoutExpired):
        return False


def execution_error(entry: dict) -> dict | None:
    """The execution_error message of a failed history entry, if any."""
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return data
    return None


def start_server(root: Path, *, loras: Path | None = None, folders: dict[str, Path] | None = None,
                 comfy_dir: Path = COMFY, log_path: Path | None = None, **start) -> ComfyServer:
    """A server whose output, user and temp folders are under ``root``, with ``loras`` (default
    root/loras) as its first loras folder: files that graphs save (SaveTriLoRA) land there, not in
    the host's models/loras. ``folders`` adds model folders by kind ({"checkpoints": path}).
    The server's ``loras`` and ``output`` attributes name the folders; ``start`` goes to
    ComfyServer.start (python, cpu, timeout)."""
    loras = loras or root / "loras"
    output, user = root / "output", root / "user"
    for folder in (loras, output, user):
        folder.mkdir(parents=True, exist_ok=True)
    config = root / "extra_model_paths.yaml"
    entries = {"loras": loras, **(folders or {})}
    # JSON strings are YAML strings: paths with spaces or colons stay one value
    config.write_text("trilora_harness:\n  is_default: true\n"
                      + "".join(f"  {kind}: {json.dumps(str(path))}\n" for kind, path in entries.items()))
    server = ComfyServer.start(comfy_dir, output, user, log_path or root / "server.log",
                               extra_model_paths=config, **start)
    server.loras, server.output = loras, output
    return server
