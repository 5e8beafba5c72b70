"""The loader's per-epoch preparation: from asking for an epoch to the gather being ready (no data copied).

The cache is ``SHARDSTORE_BENCH_PLAN_SHARDS`` (default 122) shards of 2048 tiny samples (the preparation
reads no data). Each round prepares a new epoch of one rank (batches of 64) as the loader's planning
thread does: ``Job(key).plan(dataset.rank_plan(epoch, 0))``. The baseline, timed in the same run
(``SHARDSTORE_BENCH_PLAN_ROUNDS`` rounds, default 50), is the preparation it replaced: the rank's global
ids (the epoch expanded, then split), located again with a binary search per sample and ``np.unique``.
``extra_info`` holds both medians in milliseconds and their ratio.
"""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path

import numpy as np
import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from shardstore import ShardStore, ShardWriter, build_manifest
from shardstore.dataset.subset import RandomShardSubsetCachedDataset
from shardstore.kernels import BatchGather
from shardstore.loader.jobs import Job
from shardstore.sampling.plan import plan_epoch, rank_indices

SHARDS = int(os.environ.get("SHARDSTORE_BENCH_PLAN_SHARDS", "122"))
ROUNDS = int(os.environ.get("SHARDSTORE_BENCH_PLAN_ROUNDS", "50"))
SHARD_SIZE = 2048
BATCH = 64


@pytest.fixture(scope="module")
def plan_store(tmp_path_factory: pytest.TempPathFactory) -> ShardStore:
    root: Path = tmp_path_factory.mktemp("plan")
    total = SHARDS * SHARD_SIZE
    with ShardWriter(root, SHARD_SIZE, fsync=False) as w:
        for lo in range(0, total, 8 * SHARD_SIZE):
            n = min(8 * SHARD_SIZE, total - lo)
            w.add_batch({"images": np.zeros((n, 3, 4, 4), np.uint8), "labels": np.arange(lo, lo + n)})
    build_manifest(root)
    return ShardStore.open(root)


def prepare(ds: RandomShardSubsetCachedDataset, epoch: int) -> Job:
    """What the loader's planning thread does for an epoch."""
    job = Job((epoch, 0))
    job.plan(ds.rank_plan(epoch, 0))
    return job


def prepare_from_ids(ds: RandomShardSubsetCachedDataset, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The preparation the plan replaced: global ids, then each one located again, shards found by ``np.unique``."""
    store = ds.store
    plan = plan_epoch(np.diff(store.offsets), store.offsets, ds.spec, epoch)
    indices = rank_indices(plan, ds.world, ds.batch_size, ds.max_steps_per_epoch)
    positions, rows = store.locate(indices)
    visited, first_seen, inverse = np.unique(positions, return_index=True, return_inverse=True)
    rank = np.argsort(first_seen, kind="stable")
    local_of = np.empty_like(rank)
    local_of[rank] = np.arange(rank.size)
    visited = visited[rank].astype(np.int64)
    source_index = local_of[inverse.reshape(-1)].astype(np.int64)
    batch_of = np.arange(indices.size, dtype=np.int64) // ds.batch_size
    first_batch = np.full(visited.size, np.iinfo(np.int64).max, np.int64)
    last_batch = np.full(visited.size, -1, np.int64)
    np.minimum.at(first_batch, source_index, batch_of)
    np.maximum.at(last_batch, source_index, batch_of)
    counts = np.diff(store.offsets)[visited]
    BatchGather(counts, {name: (spec.dtype, spec.shape) for name, spec in store.fields.items()},
                lambda name, j: store.field(int(visited[j]), name))
    return visited, source_index, rows


def median_ms(fn, epochs: itertools.count, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        epoch = next(epochs)
        start = time.perf_counter()
        fn(epoch)
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


@pytest.mark.parametrize("order", ["sequential", "interleave"])
@pytest.mark.parametrize("shards_per_epoch", [15, None], ids=["15_shards", "whole_cache"])
def test_epoch_preparation(benchmark: BenchmarkFixture, plan_store: ShardStore, shards_per_epoch: int | None,
                           order: str) -> None:
    ds = RandomShardSubsetCachedDataset(plan_store, shards_per_epoch, 42, sample_order=order, batch_size=BATCH)
    # The same work both ways: the job reads exactly the samples (and shards, in order) the ids name.
    job = prepare(ds, 7)
    visited, source_index, rows = prepare_from_ids(ds, 7)
    np.testing.assert_array_equal(job.visited, visited)
    np.testing.assert_array_equal(job.source_index, source_index)
    np.testing.assert_array_equal(job.rows, rows)
    epochs = itertools.count(100)
    benchmark.pedantic(lambda: prepare(ds, next(epochs)), rounds=ROUNDS, iterations=1, warmup_rounds=1)
    if benchmark.stats is None:  # --benchmark-disable: a correctness run at a tiny size
        return
    baseline_ms = median_ms(lambda e: prepare_from_ids(ds, e), itertools.count(100), ROUNDS)
    plan_ms = benchmark.stats.stats.median * 1e3
    benchmark.extra_info.update(samples=job.num_samples, visited_shards=int(job.visited.size),
                                prep_ms=round(plan_ms, 3), baseline_ms=round(baseline_ms, 3),
                                baseline_over_prep=round(baseline_ms / plan_ms, 2))
