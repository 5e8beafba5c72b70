"""shardstore: shard-level random epochs over a memory-mapped tensor cache, for fast distillation.

Everything a user needs is importable from here::

    from shardstore import ShardWriter, build_manifest, ShardStore, RandomShardSubsetCachedDataset, ShardLoader

Only the exception family is imported with the package; every other name is imported on first use
(PEP 562), so ``import shardstore`` loads neither torch nor NumPy nor the compiled extension, and a
script that only writes or reads a cache never imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from shardstore.errors import ConfigError, CorruptShardError, ManifestError, ShardstoreError, WriterError

if TYPE_CHECKING:
    from shardstore.config.resolve import RunConfig, load_run_config
    from shardstore.dataset.cached import CachedTensorDataset
    from shardstore.dataset.subset import RandomShardSubsetCachedDataset
    from shardstore.kd.trainer import train
    from shardstore.loader import ShardLoader
    from shardstore.manifest.build import BuildReport, build_manifest
    from shardstore.manifest.verify import verify_checksums
    from shardstore.store.manifest import FieldSpec, Manifest, ShardEntry
    from shardstore.store.reader import ShardStore
    from shardstore.store.writer import ShardWriter

# Public name -> the module that defines it, imported when the name is first read.
_LAZY = {
    # store and manifest: NumPy only
    "BuildReport": "shardstore.manifest.build",
    "FieldSpec": "shardstore.store.manifest",
    "Manifest": "shardstore.store.manifest",
    "ShardEntry": "shardstore.store.manifest",
    "ShardStore": "shardstore.store.reader",
    "ShardWriter": "shardstore.store.writer",
    "build_manifest": "shardstore.manifest.build",
    "verify_checksums": "shardstore.manifest.verify",
    # configs: PyYAML
    "RunConfig": "shardstore.config.resolve",
    "load_run_config": "shardstore.config.resolve",
    # datasets, loader and training: torch
    "CachedTensorDataset": "shardstore.dataset.cached",
    "RandomShardSubsetCachedDataset": "shardstore.dataset.subset",
    "ShardLoader": "shardstore.loader",
    "train": "shardstore.kd.trainer",
}

__all__ = [
    "BuildReport",
    "CachedTensorDataset",
    "ConfigError",
    "CorruptShardError",
    "FieldSpec",
    "Manifest",
    "ManifestError",
    "RandomShardSubsetCachedDataset",
    "RunConfig",
    "ShardEntry",
    "ShardLoader",
    "ShardStore",
    "ShardWriter",
    "ShardstoreError",
    "WriterError",
    "build_manifest",
    "load_run_config",
    "train",
    "verify_checksums",
]


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use and keep the name here, so the next read is a plain lookup."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name == "__version__":
        value = _version()
    else:
        raise AttributeError(f"module 'shardstore' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | {"__version__"})


def _version() -> str:
    """One version, pyproject.toml's, as the installed package's metadata says it."""
    from importlib import metadata

    try:
        return metadata.version("shardstore")
    except metadata.PackageNotFoundError:  # a source tree on sys.path that was never installed
        return "0+unknown"
