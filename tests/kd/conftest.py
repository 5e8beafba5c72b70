"""A tiny digits-like cache and configs small enough to train in seconds on a CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shardstore import ShardWriter, build_manifest

TINY = {
    "train.epochs": 3, "train.batch_size": 16, "train.max_steps_per_epoch": None, "train.lr": 0.01,
    "train.base_batch_size": 16, "train.warmup_steps": 2, "train.log.every_steps": 1,
    "train.log.tensorboard": False, "train.eval.held_out_shards": 2, "train.eval.batch_size": 32,
    "model.teacher.name": "cnn_small", "model.teacher.kwargs": {"width": 8}, "model.teacher.checkpoint": None,
    "model.teacher.input.size": 16, "model.student.name": "cnn_small", "model.student.kwargs": {"width": 4},
    "model.student.input.size": 16, "data.shards_per_epoch": 4, "data.loader_threads": 1,
}


def write_tiny_cache(root: Path, num_shards: int = 8, shard_size: int = 32, size: int = 16, seed: int = 0) -> Path:
    """Learnable 10-class images: class c is a bright square at a position that depends on c."""
    rng = np.random.default_rng(seed)
    n = num_shards * shard_size
    labels = rng.integers(0, 10, n)
    images = rng.integers(0, 40, (n, 3, size, size)).astype(np.uint8)
    for i, c in enumerate(labels):
        y, x = divmod(int(c), 4)
        images[i, :, 2 + 3 * y : 5 + 3 * y, 2 + 3 * x : 5 + 3 * x] = 220
    with ShardWriter(root, shard_size, fsync=False) as w:
        w.add_batch({"images": images, "labels": labels.astype(np.int64)})
    build_manifest(root)
    return root


def overrides(run_dir: Path, cache: Path, **extra) -> list[str]:
    import yaml

    values = {**TINY, "train.run_dir": str(run_dir), "data.cache_root": str(cache),
              **{k.replace("__", "."): v for k, v in extra.items()}}
    return [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
            for k, v in values.items()]


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_cache(tmp_path_factory.mktemp("kd") / "cache")
