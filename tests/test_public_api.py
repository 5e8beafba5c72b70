"""The package root's public names: frozen, importable without torch or the compiled extension, each the right one."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import shardstore

# Every public name and the module that defines it. Adding, removing or moving a name is an API change: update this.
PUBLIC = {
    "BuildReport": "shardstore.manifest.build",
    "CachedTensorDataset": "shardstore.dataset.cached",
    "ConfigError": "shardstore.errors",
    "CorruptShardError": "shardstore.errors",
    "FieldSpec": "shardstore.store.manifest",
    "Manifest": "shardstore.store.manifest",
    "ManifestError": "shardstore.errors",
    "RandomShardSubsetCachedDataset": "shardstore.dataset.subset",
    "RunConfig": "shardstore.config.resolve",
    "ShardEntry": "shardstore.store.manifest",
    "ShardLoader": "shardstore.loader.shard_loader",
    "ShardStore": "shardstore.store.reader",
    "ShardWriter": "shardstore.store.writer",
    "ShardstoreError": "shardstore.errors",
    "WriterError": "shardstore.errors",
    "build_manifest": "shardstore.manifest.build",
    "load_run_config": "shardstore.config.resolve",
    "train": "shardstore.kd.trainer",
    "verify_checksums": "shardstore.manifest.verify",
}

README = Path(__file__).resolve().parents[1] / "README.md"


def run_python(code: str) -> str:
    """``code``'s stdout in a fresh interpreter, where nothing has been imported yet."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_all_is_frozen_and_sorted() -> None:
    assert shardstore.__all__ == sorted(PUBLIC)


def test_import_loads_neither_torch_nor_the_extension() -> None:
    code = ("import sys, json, shardstore\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'cshard'))))")
    assert json.loads(run_python(code)) == []


@pytest.mark.slow
def test_each_name_resolves_to_its_defining_object() -> None:
    # In a fresh interpreter, so each lazy name is resolved here for the first time.
    code = (
        "import importlib, json, shardstore\n"
        f"public = {PUBLIC!r}\n"
        "print(json.dumps([n for n, m in public.items()\n"
        "                  if getattr(shardstore, n) is not getattr(importlib.import_module(m), n)]))"
    )
    assert json.loads(run_python(code)) == []


def test_star_import_and_dir_offer_every_public_name() -> None:
    namespace: dict[str, object] = {}
    exec("from shardstore import *", namespace)
    assert set(PUBLIC) <= set(namespace)
    assert set(PUBLIC) | {"__version__"} <= set(dir(shardstore))


def test_unknown_name_is_an_attribute_error_and_submodules_still_import() -> None:
    with pytest.raises(AttributeError, match="module 'shardstore' has no attribute 'ShardReader'"):
        shardstore.ShardReader  # noqa: B018
    from shardstore import kernels, reference

    assert kernels.__name__ == "shardstore.kernels" and reference.__name__ == "shardstore.reference"


def test_a_used_kernel_loads_the_extension_once() -> None:
    code = (
        "import sys, numpy as np\n"
        "from shardstore import kernels\n"
        "before = 'cshard._kernels' in sys.modules\n"
        "kernels.locate_rows(np.array([1], np.int64), np.array([0, 2], np.int64))\n"
        "import cshard._kernels\n"
        "print(before, kernels._kernels is cshard._kernels)"
    )
    assert run_python(code).split() == ["False", "True"]


def test_missing_extension_is_an_error_at_first_use_not_a_fallback() -> None:
    code = (
        "import sys; sys.modules['cshard._kernels'] = None\n"
        "import numpy as np, shardstore\n"
        "from shardstore import kernels\n"
        "for _ in range(2):\n"
        "    try:\n"
        "        kernels.locate_rows(np.array([1], np.int64), np.array([0, 2], np.int64))\n"
        "    except ImportError as e:\n"
        "        print(e)\n"
        "    else:\n"
        "        print('ran')"
    )
    lines = run_python(code).splitlines()
    assert len(lines) == 2
    for line in lines:
        assert line.startswith("shardstore's compiled extension is not built; run `pip install -e .`")


def test_readme_imports_public_names_from_the_top_level() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    deep = [line for block in blocks for line in block.splitlines()
            if (m := re.match(r"\s*from (shardstore\.[\w.]+) import (.+)", line))
            and {n.strip() for n in m.group(2).split(",")} & set(PUBLIC)]
    assert blocks and deep == []
