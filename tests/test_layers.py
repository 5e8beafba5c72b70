"""Imports point from higher layers to lower ones only (store <- manifest <- ... <- cli)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "shardstore"
# Rank of each module or subpackage; a module may import only from ranks <= its own.
RANKS = {
    "errors": 0, "kernels": 0, "pagecache": 0, "reference": 0, "remote": 0,
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


def imported_modules(tree: ast.AST, module: str) -> list[str]:
    """Dotted names of the ``shardstore`` modules (and third-party modules) that ``module``'s code imports.

    ``from shardstore import kd`` imports ``shardstore.kd``; ``from shardstore import ShardStore`` and
    ``import shardstore`` import the package root (``shardstore.__init__``, which imports every layer);
    relative imports are resolved against ``module``.
    """
    package = module.split(".")[:-1]  # shardstore.store.writer and shardstore.store.__init__: shardstore.store
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name if a.name != "shardstore" else "shardstore.__init__" for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package[: len(package) - (node.level - 1)]
                base = ".".join(parent + ([base] if base else []))
            if base == "shardstore":
                for alias in node.names:  # a layer, or a name defined by the package root
                    layer = alias.name if alias.name in RANKS else "__init__"
                    names.append(f"shardstore.{layer}")
            elif base:
                names.append(base)
    return names


def upward_edges(source: str, module: str) -> list[str]:
    """The imports in ``source`` (``module``'s code) pointing to a higher layer, or to typer/rich outside the CLI."""
    own = layer_of(module)
    assert own in RANKS, f"{module} belongs to no layer; add it to RANKS"
    edges = []
    for name in imported_modules(ast.parse(source), module):
        if name.startswith("shardstore."):
            target = name.split(".")[1]
            if RANKS[target] > RANKS[own]:
                edges.append(f"{module} imports {name}: an edge pointing up")
        if name in ("typer", "rich") or name.startswith(("typer.", "rich.")):
            if own not in ("cli", "__main__"):
                edges.append(f"{module} imports {name}: only the CLI may")
    return edges


@pytest.mark.parametrize(("module", "path"), modules(), ids=[m for m, _ in modules()])
def test_imports_point_down(module: str, path: Path) -> None:
    assert upward_edges(path.read_text(), module) == []


@pytest.mark.parametrize(("source", "module"), [
    ("from shardstore import kd", "shardstore.store.writer"),
    ("from shardstore import errors, loader", "shardstore.manifest.build"),
    ("from shardstore import ShardStore", "shardstore.store.writer"),
    ("import shardstore", "shardstore.manifest.build"),
    ("import shardstore.kd.trainer", "shardstore.loader.jobs"),
    ("from shardstore.cli import app", "shardstore.kd.trainer"),
    ("from ..kd import trainer", "shardstore.store.writer"),
    ("from .. import loader", "shardstore.sampling.plan"),
    ("from . import writer\nfrom .. import demo", "shardstore.store.__init__"),
    ("def f():\n    from shardstore import demo", "shardstore.kd.trainer"),
    ("import rich.console", "shardstore.kd.trainer"),
])
def test_the_checker_sees_every_spelling_of_an_upward_import(source: str, module: str) -> None:
    assert upward_edges(source, module), f"{source!r} in {module} was not seen"


@pytest.mark.parametrize(("source", "module"), [
    ("from shardstore import kernels, errors", "shardstore.store.writer"),
    ("from shardstore.store.layout import x", "shardstore.manifest.build"),
    ("from . import layout\nfrom .atomic import fsync_dir", "shardstore.store.writer"),
    ("from shardstore import kd\nimport shardstore", "shardstore.cli.train"),
    ("import typer", "shardstore.cli.__init__"),
])
def test_the_checker_lets_downward_imports_pass(source: str, module: str) -> None:
    assert upward_edges(source, module) == []


def test_lower_layers_import_without_torch() -> None:
    import subprocess
    import sys

    code = "import sys, shardstore; assert 'torch' not in sys.modules and 'typer' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
