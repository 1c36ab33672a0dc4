"""The dev harness stays out of the product: ComfyUI imports the pack's __init__.py, which imports
nodes/ (and they trilora_core/); none of these may import harness/, which exists only for tests,
benchmarks and the demo."""
from __future__ import annotations

import ast
import sys

from conftest import REPO

PRODUCT = [REPO / "__init__.py", *sorted((REPO / "nodes").rglob("*.py")), *sorted((REPO / "trilora_core").rglob("*.py"))]


def imported_names(path) -> set[str]:
    """Every module an import statement in ``path`` names (relative ones without their dots)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names |= {f"{node.module or ''}.{alias.name}".lstrip(".") for alias in node.names}
    return names


def test_no_product_module_imports_the_harness():
    assert len(PRODUCT) > 10
    offenders = {str(p.relative_to(REPO)): sorted(n for n in imported_names(p) if "harness" in n.split("."))
                 for p in PRODUCT}
    assert not {k: v for k, v in offenders.items() if v}, offenders


def test_comfyuis_loader_imported_no_harness_module_as_part_of_the_pack(comfy_host):
    pack = comfy_host.pack.__name__
    ours = [name for name in sys.modules if name == pack or name.startswith(pack + ".")]
    assert f"{pack}.nodes" in ours  # the pack is what ComfyUI loaded
    assert not [name for name in ours if "harness" in name.split(".")], ours
