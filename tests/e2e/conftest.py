"""A real ComfyUI server on 127.0.0.1 with the pack installed, started once per session
(harness/server.py), and its frontend in headless Chromium (harness/browser.py).

Its loras folder is a temporary one (added through --extra-model-paths-config), so the tests
can drop files there without touching the host's folders."""
from __future__ import annotations

import pytest

from harness import COMFY, REPO, TINY
from harness.server import start_server

__all__ = ["ARTIFACTS", "COMFY", "REPO", "TINY"]  # what the test modules import from here
ARTIFACTS = REPO / "test_artifacts"  # screenshots of the browser tests (git-ignored)


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("server"), cpu=True)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def browser(server):
    """The server's own frontend in headless Chromium, opened once."""
    from harness.browser import ComfyBrowser

    with ComfyBrowser(server) as b:
        yield b
