"""Within-shard order on a class-sorted cache: label mixing per batch and read throughput, sequential vs interleave.

The cache is written in class order (10 classes over ``SHARDSTORE_BENCH_ORDER_SHARDS``
shards of 2048, default 32), the case where reading shards front to back gives batches
of one class. Each benchmark plans one epoch of 15 shards and gathers every batch of 64
from the memory maps (one fancy-indexing copy per field and shard run); ``extra_info``
holds samples/s and the mean number of distinct labels per batch.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from shardstore import ShardStore, ShardWriter, build_manifest
from shardstore.sampling.plan import EpochSpec, plan_epoch, rank_indices
from shardstore.sampling.world import World

SHARDS = int(os.environ.get("SHARDSTORE_BENCH_ORDER_SHARDS", "32"))
SHARD_SIZE = 2048
BATCH = 64


@pytest.fixture(scope="module")
def sorted_store(tmp_path_factory: pytest.TempPathFactory) -> ShardStore:
    root = tmp_path_factory.mktemp("class_sorted")
    total = SHARDS * SHARD_SIZE
    labels = np.arange(total) * 10 // total  # class order: class c fills a tenth of the cache
    with ShardWriter(root, SHARD_SIZE, fsync=False) as w:
        for lo in range(0, total, SHARD_SIZE):
            n = min(SHARD_SIZE, total - lo)
            w.add_batch({"images": np.full((n, 3, 32, 32), 7, np.uint8), "labels": labels[lo : lo + n]})
    build_manifest(root)
    return ShardStore.open(root)


def read_epoch(store: ShardStore, ids: np.ndarray) -> tuple[int, float]:
    """Gather every batch of ``ids``; return samples read and mean distinct labels per batch."""
    distinct = []
    for lo in range(0, ids.size - BATCH + 1, BATCH):
        pos, row = store.locate(ids[lo : lo + BATCH])
        labels = np.empty(BATCH, np.int64)
        images = np.empty((BATCH, 3, 32, 32), np.uint8)
        for p in np.unique(pos):
            sel = pos == p
            images[sel] = store.field(int(p), "images")[row[sel]]
            labels[sel] = store.field(int(p), "labels")[row[sel]]
        distinct.append(np.unique(labels).size)
    return ids.size, float(np.mean(distinct))


@pytest.mark.parametrize(("order", "active"),
                         [("sequential", 1), ("interleave", 2), ("interleave", 4), ("interleave", 8)])
def test_order_mixing_and_throughput(benchmark: BenchmarkFixture, sorted_store: ShardStore, order: str,
                                     active: int) -> None:
    counts = np.diff(sorted_store.offsets)
    spec = EpochSpec(shards_per_epoch=min(15, SHARDS), random_subset_seed=42,
                     shard_policy="random", sample_order=order, active_shards=active)
    ids = rank_indices(plan_epoch(counts, sorted_store.offsets, spec, 0), World(), BATCH, None)
    read_epoch(sorted_store, ids)  # warm the page cache and the maps
    start = time.perf_counter()
    samples, distinct = benchmark.pedantic(read_epoch, args=(sorted_store, ids), rounds=3, iterations=1)
    elapsed = (time.perf_counter() - start) / 3
    benchmark.extra_info.update(samples_per_s=round(samples / elapsed), distinct_labels_per_batch=round(distinct, 2))
    if order == "sequential":
        assert distinct < 1.2  # almost every batch holds one class
    else:
        assert distinct > 1.2
