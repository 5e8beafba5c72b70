"""shardstore: shard-level random epochs over a memory-mapped tensor cache, for fast distillation."""

from __future__ import annotations

from importlib import metadata as _metadata

from shardstore import kernels as _kernels  # noqa: F401  (fails loudly when the extension is not built)
from shardstore.errors import ConfigError, CorruptShardError, ManifestError, ShardstoreError, WriterError
from shardstore.manifest.build import BuildReport, build_manifest
from shardstore.store.manifest import FieldSpec, Manifest, ShardEntry
from shardstore.store.reader import ShardStore
from shardstore.manifest.verify import verify_checksums
from shardstore.store.writer import ShardWriter

try:  # one version, pyproject.toml's, as the installed package's metadata says it
    __version__ = _metadata.version("shardstore")
except _metadata.PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"

__all__ = [
    "BuildReport",
    "ConfigError",
    "CorruptShardError",
    "FieldSpec",
    "Manifest",
    "ManifestError",
    "ShardEntry",
    "ShardStore",
    "ShardWriter",
    "ShardstoreError",
    "WriterError",
    "build_manifest",
    "verify_checksums",
]
