"""Imports point from higher layers to lower ones only (store <- manifest <- ... <- cli)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "shardstore"
# Rank of each module or subpackage; a module may import only from ranks <= its own.
RANKS = {
    "errors": 0, "kernels": 0, "reference": 0,
    "store": 1,
    "manifest": 2,
    "sampling": 3, "dataset": 3,
    "loader": 4,
    "kd": 5,
    "config": 0,
    "demo": 6,
    "cli": 7, "__main__": 7, "__init__": 7,
}


def layer_of(module: str) -> str:
    return module.split(".")[1] if module.count(".") else "__init__"


def modules() -> list[tuple[str, Path]]:
    out = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        out.append((".".join(rel.parts), path))
    return out


@pytest.mark.parametrize(("module", "path"), modules(), ids=[m for m, _ in modules()])
def test_imports_point_down(module: str, path: Path) -> None:
    own = layer_of(module)
    if own.endswith("__init__") and module.count(".") == 1 and module != "shardstore.__init__":
        own = module.split(".")[1]
    assert own in RANKS, f"{module} belongs to no layer; add it to RANKS"
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        for name in names:
            if name.startswith("shardstore."):
                target = name.split(".")[1]
                assert RANKS[target] <= RANKS[own], f"{module} imports {name}: an edge pointing up"
            if name in ("typer", "rich") or name.startswith(("typer.", "rich.")):
                assert own in ("cli", "__main__"), f"{module} imports {name}: only the CLI may"


def test_lower_layers_import_without_torch() -> None:
    import subprocess
    import sys

    code = "import sys, shardstore; assert 'torch' not in sys.modules and 'typer' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
