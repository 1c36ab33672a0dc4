"""The shape of the code, read from its source (no ComfyUI needed): node modules import support
modules and the core, never each other; nodes/ uses the core only through its public names
(trilora_core.__all__); no module or class of the pack or the dev harness grows past the size a
reader takes in at once; only entry points put folders on sys.path (libraries are imported as
packages: harness.fixtures, never a script)."""
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
    assert {"nodes.curves", "nodes.load", "nodes.train", "nodes.save", "nodes.dataset", "nodes.dataset_encode",
            "nodes.tools.convert",
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


HARNESS = sorted((REPO / "harness").rglob("*.py"))


@pytest.mark.parametrize("path", [*FILES, *sorted((REPO / "trilora_core").glob("*.py")), *HARNESS],
                         ids=lambda p: module_name(p))
def test_modules_and_classes_stay_small(path):
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_MODULE_LINES, f"{path.name}: split it by concept"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ClassDef):
            assert node.end_lineno - node.lineno + 1 <= MAX_CLASS_LINES, f"{path.name}: class {node.name}"


# Entry points: the command-line scripts, the trainer's script, and a test's child process.
SYS_PATH_ALLOWED = {REPO / "train_trilora.py", REPO / "tests" / "comfy" / "oom_child.py",
                    *(REPO / "scripts").glob("*.py")}


def edits_sys_path(path: Path) -> bool:
    """Whether the module's code (not a string it passes to a child process) changes sys.path."""
    for node in ast.walk(ast.parse(path.read_text())):
        target = node.func.value if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) else None
        if isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            target = next((t.value for t in targets if isinstance(t, ast.Subscript)), None) or (
                targets[0] if isinstance(targets[0], ast.Attribute) else None)
        if (isinstance(target, ast.Attribute) and target.attr == "path" and isinstance(target.value, ast.Name)
                and target.value.id == "sys"):
            return True
    return False


def test_only_entry_points_edit_sys_path():
    sources = [p for p in REPO.rglob("*.py") if not set(p.relative_to(REPO).parts[0:1]) & {".venv", ".comfyui"}
               and "node_modules" not in p.parts]
    assert len(sources) > 50
    editors = sorted(str(p.relative_to(REPO)) for p in sources if p not in SYS_PATH_ALLOWED and edits_sys_path(p))
    assert not editors, f"{editors} put folders on sys.path: import harness and trilora_core as packages instead"
    assert edits_sys_path(REPO / "scripts" / "demo.py")  # the check sees an entry point's edit


def test_no_link_or_dev_folder_is_tracked():
    """A clone must build its own .venv/.comfyui (make setup): a tracked link there (a worktree's
    .venv pointing at another checkout) breaks every fresh clone."""
    import subprocess

    staged = subprocess.run(["git", "ls-files", "-s"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert staged, "not a git checkout"
    links = [line.split("\t", 1)[1] for line in staged.splitlines() if line.startswith("120000 ")]
    assert not links, f"tracked symbolic links: {links}"
    tracked = {line.split("\t", 1)[1].split("/")[0] for line in staged.splitlines()}
    assert not tracked & {".venv", ".comfyui"}, tracked & {".venv", ".comfyui"}
