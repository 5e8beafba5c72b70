"""``data_config.yaml`` as a typed object: unknown keys get a suggestion, bad values name the key and the fix."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from shardstore.config.data_checks import field_problems, remote_problems
from shardstore.config.schema import Problems, check_fields, load_yaml


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where the cache is and how epochs are drawn from it (keys keep the original project's names)."""

    cache_root: str
    """Directory of the cache (holding manifest.json), or an object-store URL: ``s3://bucket/prefix``, ``gs://``,
    ``az://``, ``file://`` (read through ``local_cache``)."""
    # -- a cache in object storage ----------------------------------------------------------------------------
    local_cache: str | None = None
    """For a ``cache_root`` in object storage: the node-local directory the shards an epoch needs are copied into."""
    cache_limit: Any = None
    """For a ``cache_root`` in object storage: the most ``local_cache`` may hold, in bytes or with a unit
    (``50GB``, ``512MiB``)."""
    storage_options: dict[str, Any] | None = None
    """For a ``cache_root`` in object storage: options for its client (e.g. ``endpoint``, ``region``); credentials
    come from the usual environment and profiles."""
    prefetch_shards: int = 8
    """For a ``cache_root`` in object storage: how many shards are fetched ahead of the readers."""
    # -- epochs (``epoch_settings``) ----------------------------------------------------------------------------
    cache_shard_size: int | None = None
    """Samples per shard the cache was written with, checked against the manifest; null = as the manifest says."""
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
    refresh_manifest: bool = False
    """Re-read the manifest at every epoch: shards added to the cache (and to its manifest) join from that epoch on."""
    # -- the loader (``loader_kwargs``) --------------------------------------------------------------------------
    loader_threads: int = 2
    """Background threads gathering batches (``ShardLoader(num_threads=)``); two saturate memory copies."""
    prefetch_batches: int = 4
    """Batches kept ready ahead of the trainer (``ShardLoader(prefetch=)``)."""
    read_ahead_shards: int = 2
    """Shards read into the page cache ahead of the threads; 0 turns read-ahead off."""
    drop_finished_pages: bool = False
    """Drop a shard's pages from the page cache once the epoch is done with it (a cache larger than RAM)."""
    # -- cached teacher targets ---------------------------------------------------------------------------------
    teacher_targets: str | None = None
    """Train from the teacher targets cached under this name (``cache-teacher --name``); no teacher is loaded."""
    missing_targets: str = "error"
    """Shards without those targets: ``error`` (stop and say which) or ``skip`` (train on the others)."""
    # -- the images and labels as stored (see ``shardstore.kd.images``) ------------------------------------------
    image_field: str = "images"
    """The field holding the images."""
    label_field: str = "labels"
    """The field holding the class labels (integers in ``[0, num_classes)``, one per sample)."""
    image_layout: Literal["CHW", "HWC"] | None = None
    """Axis order of a 3-d image; null = read from the manifest's per-sample shape (1 or 3 channels first or last)."""
    image_dtype: Literal["bfloat16"] | None = None
    """null = the ``.npy`` dtype (uint8, uint16, float16, float32, float64; ``V2`` is bfloat16 as ml_dtypes saves it);
    ``bfloat16``: 16-bit integer files hold bfloat16 bit patterns (``tensor.view(torch.int16).numpy()``)."""
    image_scale: float | None = None
    """The stored value of full intensity (white); images are divided by it. null = 255 for uint8, 65535 for uint16,
    1 for floats."""
    image_normalized: bool = False
    """The stored images are already mean/std normalised: the networks' ``input.mean`` and ``std`` are skipped."""
    repeat_gray: bool = False
    """Repeat 1-channel (grayscale) images to 3 channels for networks that take 3."""

    def epoch_settings(self) -> dict[str, Any]:
        """The settings that draw epochs, by their names: ``EpochSpec`` and the dataset take the same ones."""
        return {"shards_per_epoch": self.shards_per_epoch, "random_subset_seed": self.random_subset_seed,
                "shard_policy": self.shard_policy, "sample_order": self.sample_order,
                "active_shards": self.active_shards}

    def loader_kwargs(self) -> dict[str, Any]:
        """The ``ShardLoader`` arguments this config sets."""
        return {"num_threads": self.loader_threads, "prefetch": self.prefetch_batches,
                "read_ahead_shards": self.read_ahead_shards, "drop_pages": self.drop_finished_pages}


def data_config_from_dict(values: dict[str, Any], source: str = "data_config.yaml") -> DataConfig:
    """Check keys and types of a data config mapping; ``ConfigError`` naming ``source``, the key and the fix.

    Every problem of the mapping is reported at once (one line each), the value checks once keys and types are right.
    """
    problems = Problems()
    if isinstance(values, dict) and "cache_root" not in values:
        problems.add(f"{source}: `cache_root` is missing; set it to the cache directory")
    checked = problems.attempt(lambda: check_fields(DataConfig, values, source))
    problems.raise_any()
    assert checked is not None
    values = checked
    for key in ("cache_shard_size", "shards_per_epoch", "active_shards", "loader_threads", "prefetch_batches",
                "prefetch_shards"):
        if values.get(key) is not None and values[key] < 1:
            problems.add(f"{source}: `{key}` must be at least 1, got {values[key]}")
    if values.get("missing_targets", "error") not in ("error", "skip"):
        problems.add(f"{source}: `missing_targets` must be error or skip, got {values['missing_targets']!r}")
    if values.get("teacher_targets") is not None and not str(values["teacher_targets"]).strip():
        problems.add(f"{source}: `teacher_targets` is empty; name the cached targets (e.g. teacher) or use null")
    for key in ("random_subset_seed", "read_ahead_shards"):
        if values.get(key, 0) < 0:
            problems.add(f"{source}: `{key}` must be non-negative, got {values[key]}")
    for problem in field_problems(values):
        problems.add(f"{source}: {problem}")
    for problem in remote_problems(values):
        problems.add(f"{source}: {problem}")
    problems.raise_any()
    return DataConfig(**values)


def load_data_config(path: str | os.PathLike[str]) -> DataConfig:
    """Read ``data_config.yaml`` (safe YAML, no aliases); a relative ``cache_root`` is taken from the file's folder."""
    path = Path(path)
    config = data_config_from_dict(load_yaml(path, option="--data-config"), str(path))
    if config.local_cache is not None:
        local = Path(config.local_cache).expanduser()
        config = replace(config, local_cache=str(local if local.is_absolute() else path.parent / local))
    if "://" in config.cache_root:
        return config
    root = Path(config.cache_root).expanduser()
    if not root.is_absolute():
        root = path.parent / root
    return replace(config, cache_root=str(root))
