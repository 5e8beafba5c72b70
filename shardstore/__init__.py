"""shardstore: shard-level random epochs over a memory-mapped tensor cache, for fast distillation."""

from __future__ import annotations

from shardstore import kernels as _kernels  # noqa: F401  (fails loudly when the extension is not built)
from shardstore.errors import ConfigError, CorruptShardError, ManifestError, ShardstoreError, WriterError
from shardstore.manifest.build import BuildReport, build_manifest
from shardstore.manifest.model import FieldSpec, Manifest, ShardEntry
from shardstore.manifest.reader import ShardStore
from shardstore.manifest.verify import verify_checksums
from shardstore.store.writer import ShardWriter

__version__ = "0.1.0"

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
