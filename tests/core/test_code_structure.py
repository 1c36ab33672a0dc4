"""The shape of the pack's code, read from its source (no ComfyUI needed): node modules import
support modules and the core, never each other; nodes/ uses the core only through its public
names (trilora_core.__all__); no module or class grows past the size a reader takes in at once."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import trilora_core

REPO = Path(__file__).resolve().parents[2]
NODES = REPO / "nodes"
# Command-line entry points that run the nodes themselves; no node module imports them.
ENTRY_POINTS = {"nodes.train_cli"}
MAX_MODULE_LINES = 450
MAX_CLASS_LINES = 160


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for each relative import of the file."""
    name = module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)]
            names = [a.name for a in node.names]
            if node.module:
                found.append((".".join([*base, node.module]), names))
            else:  # from .. import spectrum_plot: each name is a module
                found.extend((".".join([*base, n]), []) for n in names)
    return found


def is_node_module(path: Path) -> bool:
    """Defines a ComfyUI node (a class with define_schema)."""
    tree = ast.parse(path.read_text())
    return any(isinstance(c, ast.ClassDef) and any(isinstance(f, ast.FunctionDef) and f.name == "define_schema"
                                                   for f in c.body) for c in ast.walk(tree))


FILES = sorted(NODES.rglob("*.py"))
NODE_MODULES = {module_name(p) for p in FILES if is_node_module(p)}


def test_the_node_modules_are_found():
    assert {"nodes.curves", "nodes.load", "nodes.train", "nodes.save", "nodes.dataset", "nodes.tools.convert",
            "nodes.tools.extract", "nodes.tools.resize", "nodes.tools.spectrum"} == NODE_MODULES


@pytest.mark.parametrize("path", FILES, ids=lambda p: module_name(p))
def test_node_modules_never_import_each_other(path):
    me = module_name(path)
    if path.name == "__init__.py" or me in ENTRY_POINTS:  # registries and entry points list the nodes
        return
    bad = sorted({m for m, _ in imports(path) if m in NODE_MODULES and m != me})
    assert not bad, f"{me} imports the node module(s) {bad}; move what they share into a support module"


@pytest.mark.parametrize("path", FILES, ids=lambda p: module_name(p))
def test_nodes_use_the_core_through_its_public_names(path):
    for module, names in imports(path):
        if module.startswith("trilora_core"):
            assert module == "trilora_core", f"{module_name(path)} reaches into {module}"
            hidden = sorted(set(names) - set(trilora_core.__all__))
            assert not hidden, f"{module_name(path)} imports {hidden}, which trilora_core.__all__ does not list"


def test_the_core_imports_nothing_of_the_nodes():
    for path in sorted((REPO / "trilora_core").glob("*.py")):
        assert not [m for m, _ in imports(path) if m.startswith("nodes")], path


@pytest.mark.parametrize("path", [*FILES, *sorted((REPO / "trilora_core").glob("*.py"))],
                         ids=lambda p: module_name(p))
def test_modules_and_classes_stay_small(path):
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_MODULE_LINES, f"{path.name}: split it by concept"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ClassDef):
            assert node.end_lineno - node.lineno + 1 <= MAX_CLASS_LINES, f"{path.name}: class {node.name}"
