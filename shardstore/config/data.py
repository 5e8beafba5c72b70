"""``data_config.yaml`` as a typed object: unknown keys get a suggestion, bad values name the key and the fix."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from shardstore.config.schema import check_fields, load_yaml
from shardstore.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where the cache is and how epochs are drawn from it (keys keep the original project's names)."""

    cache_root: str
    """Directory of the cache (holding manifest.json)."""
    cache_shard_size: int = 2048
    """Samples per shard the cache was written with."""
    shards_per_epoch: int | None = 15
    """Whole shards per epoch; null means the whole cache."""
    random_subset_seed: int = 42
    """Seed of the per-epoch shard draw (with the epoch, the only randomness)."""
    shard_policy: str = "random"
    """``random`` (independent draws each epoch) or ``permutation`` (every shard before any repeats)."""
    sample_order: str = "sequential"
    """``sequential`` (file order) or ``interleave`` (mix ``active_shards`` shards, each read front to back)."""
    active_shards: int = 4
    """Shards read at once by ``interleave``."""
    loader_threads: int = 2
    """Background threads gathering batches (``ShardLoader(num_threads=)``); two saturate memory copies."""
    prefetch_batches: int = 4
    """Batches kept ready ahead of the trainer (``ShardLoader(prefetch=)``)."""
    read_ahead_shards: int = 2
    """Shards read into the page cache ahead of the threads; 0 turns read-ahead off."""
    drop_finished_pages: bool = False
    """Drop a shard's pages from the page cache once the epoch is done with it (a cache larger than RAM)."""
    teacher_targets: str | None = None
    """Train from the teacher targets cached under this name (``shardstore cache-teacher --name``); no teacher is loaded."""
    missing_targets: str = "error"
    """Shards without those targets: ``error`` (stop and say which) or ``skip`` (train on the others)."""

    def loader_kwargs(self) -> dict[str, Any]:
        """The ``ShardLoader`` arguments this config sets."""
        return {"num_threads": self.loader_threads, "prefetch": self.prefetch_batches,
                "read_ahead_shards": self.read_ahead_shards, "drop_pages": self.drop_finished_pages}


def data_config_from_dict(values: dict[str, Any], source: str = "data_config.yaml") -> DataConfig:
    """Check keys and types of a data config mapping; ``ConfigError`` naming ``source``, the key and the fix."""
    values = check_fields(DataConfig, values, source)
    if "cache_root" not in values:
        raise ConfigError(f"{source}: `cache_root` is missing; set it to the cache directory")
    for key in ("cache_shard_size", "shards_per_epoch", "active_shards", "loader_threads", "prefetch_batches"):
        if values.get(key) is not None and values[key] < 1:
            raise ConfigError(f"{source}: `{key}` must be at least 1, got {values[key]}")
    if values.get("missing_targets", "error") not in ("error", "skip"):
        raise ConfigError(f"{source}: `missing_targets` must be error or skip, got {values['missing_targets']!r}")
    if values.get("teacher_targets") is not None and not str(values["teacher_targets"]).strip():
        raise ConfigError(f"{source}: `teacher_targets` is empty; name the cached targets (e.g. teacher) or use null")
    for key in ("random_subset_seed", "read_ahead_shards"):
        if values.get(key, 0) < 0:
            raise ConfigError(f"{source}: `{key}` must be non-negative, got {values[key]}")
    return DataConfig(**values)


def load_data_config(path: str | os.PathLike[str]) -> DataConfig:
    """Read ``data_config.yaml`` (safe YAML, no aliases); a relative ``cache_root`` is taken from the file's folder."""
    path = Path(path)
    config = data_config_from_dict(load_yaml(path, option="--data-config"), str(path))
    root = Path(config.cache_root).expanduser()
    if not root.is_absolute():
        root = path.parent / root
    return replace(config, cache_root=str(root))
