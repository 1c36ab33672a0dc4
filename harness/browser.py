"""The real ComfyUI frontend in headless Chromium (the server's client is harness/server.py).

ComfyUI's backend cannot run a UI-format workflow (the JSON users drag in): only the frontend's
own `app.graphToPrompt()` turns one into the API prompt the server queues. This module opens the
frontend that the server itself serves, in Debian's Chromium driven by Playwright, loads workflow
files into it, checks that every node type is known, converts them, and takes screenshots.
`make demo` (scripts/demo.py) and the browser tests (tests/e2e/test_browser.py) both use it.

The browser never reaches beyond the server: every request to another host is aborted before it
leaves Chromium (the frontend asks api.comfy.org about releases and node packs), and Chromium
runs with its background networking, updates and sync switched off.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .server import ComfyError, ComfyServer

CHROMIUM = os.environ.get("TRILORA_CHROMIUM", "/usr/bin/chromium")
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Frontend settings for an unattended session: no first-run template browser, no update notices,
# no minimap or canvas statistics over the screenshots. They are stored in the server's user
# directory, which the demo and the tests keep temporary.
UI_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Notification.ShowVersionUpdates": False,
               "Comfy.Minimap.Visible": False, "Comfy.Graph.CanvasInfo": False}
VIEWPORT = {"width": 1920, "height": 1200}


@dataclass
class Loaded:
    """What loading a workflow into the frontend gave."""
    node_types: list[str]                                   # every node type in the workflow
    missing: list[str]                                      # types the frontend does not know
    notices: list[str] = field(default_factory=list)        # texts of dialogs/toasts shown on load
    console_errors: list[str] = field(default_factory=list)
    # "Type.widget=value" for a file choice this server does not have (e.g. the user's own
    # checkpoint); newer frontends flag such nodes, which is not a missing node type
    missing_files: list[str] = field(default_factory=list)


@dataclass
class Converted:
    prompt: dict        # API format, what /prompt takes
    workflow: dict      # UI format, as the frontend would save it now (with the overrides)
    loaded: Loaded


_JS_LOAD = """async ([workflow, name]) => {
  const shown = () => [...document.querySelectorAll('.p-toast-message, .p-dialog')];
  const before = new Set(shown());
  await app.loadGraphData(workflow, true, true, name);
  await new Promise(r => setTimeout(r, 300));
  const types = [];
  const walk = (nodes) => { for (const n of nodes || []) { types.push(n.type); } };
  walk(workflow.nodes);
  for (const sg of (workflow.definitions?.subgraphs || [])) walk(sg.nodes);
  const known = LiteGraph.registered_node_types;
  const missing = [...new Set(types.filter(t => !(t in known)))];
  const absent = n => (n.widgets || []).filter(w => w.type === 'combo' && Array.isArray(w.options?.values)
                                                   && !w.options.values.includes(w.value));
  const files = app.graph.nodes.flatMap(n => absent(n).map(w => `${n.type}.${w.name}=${w.value}`));
  const broken = app.graph.nodes.filter(n => n.has_errors && !absent(n).length).map(n => n.type);
  const notices = shown().filter(e => !before.has(e)).map(e => e.innerText.trim()).filter(t => t);
  return {node_types: types, missing: [...new Set([...missing, ...broken])], notices, files};
}"""

_JS_SET_WIDGETS = """(overrides) => {
  const unmatched = [];
  for (const [key, widgets] of Object.entries(overrides)) {
    const nodes = app.graph.nodes.filter(n => n.type === key || String(n.id) === key || n.title === key);
    if (!nodes.length) { unmatched.push(key); continue; }
    for (const node of nodes) {
      for (const [name, value] of Object.entries(widgets)) {
        const w = (node.widgets || []).find(w => w.name === name);
        if (!w) { unmatched.push(key + '.' + name); continue; }
        w.value = value;
        w.callback?.(value);
      }
    }
  }
  app.graph.setDirtyCanvas(true, true);
  return unmatched;
}"""

_JS_FIT = """() => {
  // Fits the whole graph into the part of the canvas that the side bar and top bars leave free.
  const items = [...app.graph.nodes, ...(app.graph.groups || [])];
  if (!items.length) return;
  let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
  for (const it of items) {
    const b = it.boundingRect;
    x0 = Math.min(x0, b[0]); y0 = Math.min(y0, b[1]);
    x1 = Math.max(x1, b[0] + b[2]); y1 = Math.max(y1, b[1] + b[3]);
  }
  const r = app.canvas.canvas.getBoundingClientRect();
  const left = 80, top = 110, right = 20, bottom = 30;
  const scale = Math.min(1, (r.width - left - right) / (x1 - x0), (r.height - top - bottom) / (y1 - y0));
  const ds = app.canvas.ds;
  ds.scale = scale;
  ds.offset[0] = left / scale - x0 + ((r.width - left - right) / scale - (x1 - x0)) / 2;
  ds.offset[1] = top / scale - y0;
  app.canvas.setDirty(true, true);
}"""

_JS_WIDGET_POINT = """([type, name]) => {
  const node = app.graph.nodes.find(n => n.type === type);
  if (!node) return null;
  const w = node.widgets.find(w => w.name === name);
  if (!w) return null;
  const [cx, cy] = app.canvas.ds.convertOffsetToCanvas([node.pos[0] + node.size[0] / 2, node.pos[1] + w.y + 10]);
  const r = app.canvas.canvas.getBoundingClientRect();
  return {x: r.left + cx, y: r.top + cy, type: w.type,
          options: w.options, value: w.value};
}"""


class ComfyBrowser:
    """One headless Chromium with the server's frontend open; reuse it for many workflows."""

    def __init__(self, server: ComfyServer | str, chromium: str = CHROMIUM):
        self.server = server if isinstance(server, ComfyServer) else ComfyServer(server)
        self.chromium = chromium
        self.blocked: list[str] = []        # requests to anything but the server, aborted
        self.console_errors: list[str] = []
        self._pw = self._browser = self.page = None

    def __enter__(self) -> ComfyBrowser:
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> None:
        from playwright.sync_api import sync_playwright

        if not Path(self.chromium).is_file():
            raise ComfyError(f"{self.chromium} not found: `make setup` installs Debian's chromium")
        self.server.post("/settings", UI_SETTINGS)
        self._pw = sync_playwright().start()
        try:
            self._browser = self._pw.chromium.launch(executable_path=self.chromium, args=BROWSER_ARGS,
                                                     headless=True)
            context = self._browser.new_context(viewport=VIEWPORT)
            context.route("**/*", self._route)
            # The frontend's "Try Nodes 2.0" banner remembers its dismissal in localStorage.
            context.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true')")
            self.page = context.new_page()
            self.page.on("console", lambda m: m.type == "error" and self.console_errors.append(m.text))
            self.page.goto(self.server.url + "/", wait_until="domcontentloaded", timeout=120_000)
            self.page.wait_for_function(
                "window.app && window.app.graph && window.LiteGraph && window.app.canvas"
                " && Object.keys(LiteGraph.registered_node_types).length > 100", timeout=120_000)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._browser:
            self._browser.close()
        if self._pw:
            self._pw.stop()
        self._pw = self._browser = self.page = None

    def _route(self, route) -> None:
        url = route.request.url
        if url.startswith(self.server.url + "/") or url == self.server.url or url.startswith(("data:", "blob:")):
            route.continue_()
        else:
            self.blocked.append(url)
            route.abort()

    # -- workflows

    def load(self, workflow: dict, name: str | None = None) -> Loaded:
        """Loads a UI workflow as a user opening the file would (`name` shows on its tab); what
        the frontend made of it."""
        errors_before = len(self.console_errors)
        result = self.page.evaluate(_JS_LOAD, [workflow, name])
        for _ in range(3):  # close what load showed (e.g. the missing-nodes dialog): it blocks the canvas
            if not self.page.evaluate("document.querySelectorAll('.p-dialog').length"):
                break
            self.page.keyboard.press("Escape")
            self.page.wait_for_timeout(200)
        return Loaded(result["node_types"], sorted(result["missing"]), result["notices"],
                      self.console_errors[errors_before:], sorted(result["files"]))

    def set_widgets(self, overrides: dict[str, dict]) -> None:
        """Sets widget values in the loaded graph: {node type, id or title: {widget: value}}.
        Every key and widget must exist, so a renamed input fails loudly."""
        unmatched = self.page.evaluate(_JS_SET_WIDGETS, overrides)
        if unmatched:
            raise ComfyError(f"no such node/widget in the workflow: {', '.join(unmatched)}")

    def graph_to_prompt(self) -> tuple[dict, dict]:
        """(API prompt, UI workflow) of the loaded graph, by the frontend's own converter."""
        # JSON.stringify in the page, as the frontend's own export does: it drops undefined fields,
        # which Playwright would otherwise hand over as nulls.
        result = json.loads(self.page.evaluate(
            "async () => { const p = await app.graphToPrompt();"
            " return JSON.stringify({output: p.output, workflow: p.workflow}); }"))
        return result["output"], result["workflow"]

    def convert(self, workflow: dict, overrides: dict[str, dict] | None = None,
                name: str | None = None) -> Converted:
        """Loads, applies the widget overrides, converts. Raises if a node type is missing."""
        loaded = self.load(workflow, name)
        if loaded.missing:
            raise ComfyError(f"the frontend does not know these node types: {', '.join(loaded.missing)}")
        if overrides:
            self.set_widgets(overrides)
        prompt, ui = self.graph_to_prompt()
        return Converted(prompt, ui, loaded)

    def build(self, spec: dict) -> dict:
        """Builds a graph from a spec (see harness/workflows.py) with the frontend's own
        LiteGraph, fits the view to it, and returns it as the frontend saves it."""
        self.page.evaluate(_JS_BUILD, spec)
        self.fit()
        return self.graph_to_prompt()[1]

    # -- looking at it

    def fit(self) -> None:
        self.page.evaluate(_JS_FIT)
        self._settle()

    def screenshot(self, path: Path | str, *, fit: bool = True, jpeg_quality: int | None = None) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if fit:
            self.fit()
        kwargs = {"type": "jpeg", "quality": jpeg_quality} if jpeg_quality else {"type": "png"}
        self.page.screenshot(path=str(path), **kwargs)
        return path

    def widget(self, node_type: str, name: str) -> dict | None:
        """A widget of the first node of that type: its type, options, value and screen point."""
        return self.page.evaluate(_JS_WIDGET_POINT, [node_type, name])

    def hover_tooltip(self, node_type: str, name: str, timeout: float = 5.0) -> str:
        """Hovers the mouse over a widget as a user would; the tooltip the frontend shows."""
        point = self.widget(node_type, name)
        if point is None:
            raise ComfyError(f"no widget {node_type}.{name} in the graph")
        tip = self.page.locator(".node-tooltip")
        self.page.mouse.move(5, 5)  # off the canvas: the frontend hides any earlier tooltip
        tip.wait_for(state="hidden", timeout=timeout * 1000)
        self.page.mouse.move(point["x"], point["y"], steps=4)
        tip.wait_for(state="visible", timeout=timeout * 1000)
        return tip.inner_text()

    def _settle(self) -> None:
        self.page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")


_JS_BUILD = """(spec) => {
  app.graph.clear();
  if (spec.id) app.graph.id = spec.id;
  const byKey = {};
  for (const n of spec.nodes) {
    const node = LiteGraph.createNode(n.type);
    if (!node) throw new Error('unknown node type ' + n.type);
    if (n.title) node.title = n.title;
    app.graph.add(node);
    node.pos = n.pos;
    for (const [name, value] of Object.entries(n.widgets || {})) {
      const w = (node.widgets || []).find(w => w.name === name);
      if (!w) throw new Error(n.type + ' has no widget ' + name + ': ' + (node.widgets || []).map(w => w.name));
      w.value = value;
    }
    const size = node.computeSize();
    node.size = [Math.max(size[0], n.size?.[0] || 0), Math.max(size[1], n.size?.[1] || 0)];
    if (n.color) { node.color = n.color[0]; node.bgcolor = n.color[1]; }
    byKey[n.key] = node;
  }
  for (const [a, out, b, inp] of spec.links) {
    const src = byKey[a], dst = byKey[b];
    if (!src || !dst) throw new Error('bad link ' + [a, out, b, inp]);
    const oslot = typeof out === 'number' ? out : src.findOutputSlot(out);
    const islot = dst.findInputSlot(inp);
    if (oslot < 0 || islot < 0) throw new Error('no slot for link ' + [a, out, b, inp]);
    if (!src.connect(oslot, dst, islot)) throw new Error('could not connect ' + [a, out, b, inp]);
  }
  for (const g of spec.groups || []) {
    const group = new LiteGraph.LGraphGroup(g.title);
    if (g.color) group.color = g.color;
    app.graph.add(group);
    // From positions and sizes: bounding boxes are only computed when the canvas draws.
    const title = LiteGraph.NODE_TITLE_HEIGHT, pad = 12;
    let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
    for (const m of g.members.map(k => byKey[k])) {
      x0 = Math.min(x0, m.pos[0]); y0 = Math.min(y0, m.pos[1] - title);
      x1 = Math.max(x1, m.pos[0] + m.size[0]); y1 = Math.max(y1, m.pos[1] + m.size[1]);
    }
    group.pos = [x0 - pad, y0 - pad - group.titleHeight];
    group.size = [x1 - x0 + 2 * pad, y1 - y0 + 2 * pad + group.titleHeight];
  }
  app.graph.setDirtyCanvas(true, true);
}"""
