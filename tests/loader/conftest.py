"""Caches for the loader tests: uneven shards whose ``gid`` field holds each sample's global id."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from shardstore import ShardStore, ShardWriter, build_manifest

COUNTS = [32, 32, 17, 32, 32, 9, 32, 32, 25, 32, 32, 32]


def write_gid_cache(root: Path, counts: list[int] = COUNTS, image_shape: tuple[int, ...] = (3, 4, 4)) -> Path:
    """Shard ``k`` holds ``counts[k]`` samples; every field encodes the global id, so misplaced rows show."""
    gid = 0
    cap = max(counts)
    for shard_id, n in enumerate(counts):
        ids = np.arange(gid, gid + n, dtype=np.int64)
        with ShardWriter(root, cap, start_shard=shard_id, num_shards=1, fsync=False) as w:
            w.add_batch({
                "gid": ids,
                "image": (ids[:, None] + np.arange(int(np.prod(image_shape)))).astype(np.uint8)
                .reshape(n, *image_shape),
                "emb": (ids[:, None] * np.array([1.0, -2.0], np.float32)).astype(np.float32),
            })
        gid += n
    build_manifest(root)
    return root


@pytest.fixture(scope="module")
def gid_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_gid_cache(tmp_path_factory.mktemp("loader"))


@pytest.fixture
def store(gid_root: Path) -> ShardStore:
    return ShardStore.open(gid_root)


def loader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("shardstore-")]


@pytest.fixture(autouse=True)
def no_threads_left_behind():
    """Every test must leave no loader thread running (once its loaders are gone).

    A loader kept alive only by a reference cycle stops its threads when the cycle is collected,
    so threads still running are collected for first. A full collection costs up to half a second
    once the whole suite's modules are loaded, so it runs only when there is a thread to explain.
    """
    yield
    if not loader_threads():
        return
    import gc

    gc.collect()
    for t in loader_threads():
        t.join(timeout=5)
    assert not loader_threads(), f"loader threads left running: {loader_threads()}"
