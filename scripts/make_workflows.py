"""Builds the workflow files in workflows/ with the real ComfyUI frontend, so they are exactly what
the frontend saves (UI format, its own widget order, link ids and view), and load in ComfyUI
with no warnings. Also writes each workflow's template thumbnail (<name>.jpg) and its screenshot
for the README (docs/<name>.png). The graphs themselves are in harness/workflows.py.

    .venv/bin/python scripts/make_workflows.py          # needs `make setup`; starts its own server
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: harness
from harness import REPO  # noqa: E402
from harness.browser import ComfyBrowser  # noqa: E402
from harness.server import ComfyServer, start_server  # noqa: E402
from harness.workflows import WORKFLOW_SPECS, workflow_id  # noqa: E402

WORKFLOWS = REPO / "workflows"
DOCS = REPO / "docs"


def shrink_png(path: Path) -> None:
    """256 colours are plenty for a screenshot of the dark UI: a third of the size."""
    from PIL import Image

    with Image.open(path) as image:
        small = image.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)


def thumbnail(screenshot: Path, out: Path, width: int = 512) -> None:
    """The template browser's thumbnail: the screenshot, small, as JPEG."""
    from PIL import Image

    with Image.open(screenshot) as image:
        image = image.convert("RGB")
        image.thumbnail((width, width))
        image.save(out, quality=82, optimize=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="use this running ComfyUI server instead of starting one")
    parser.add_argument("--only", nargs="*", help="names of the workflows to build (default: all)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="trilora-workflows-") as tmp:
        server = ComfyServer(args.url) if args.url else start_server(Path(tmp), python=str(REPO / ".venv/bin/python"))
        try:
            with ComfyBrowser(server) as browser:
                for name, spec in WORKFLOW_SPECS.items():
                    if args.only and name not in args.only:
                        continue
                    workflow = browser.build({**spec(), "id": workflow_id(name)})
                    path = WORKFLOWS / f"{name}.json"
                    path.write_text(json.dumps(workflow, indent=2) + "\n")
                    loaded = browser.load(json.loads(path.read_text()), name)  # as a user opening the file
                    if loaded.missing or loaded.notices:
                        raise SystemExit(f"{name}: missing {loaded.missing}, notices {loaded.notices}")
                    shrink_png(browser.screenshot(DOCS / f"{name}.png"))
                    thumbnail(DOCS / f"{name}.png", WORKFLOWS / f"{name}.jpg")
                    print(f"wrote {path.relative_to(REPO)} ({len(workflow['nodes'])} nodes), its thumbnail "
                          f"and docs/{name}.png")
        finally:
            if not args.url:
                server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
