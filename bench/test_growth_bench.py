"""``set_epoch`` on a cache that grows: the manifest refresh with ``refresh_manifest``, and ``set_epoch`` itself.

A synthetic format-3 table of ``SHARDSTORE_BENCH_GROWTH_SHARDS`` shards (default 10^5) of 2048 samples is
written directly (no shard files: ``set_epoch`` plans an epoch and reads no shard). Cases, each timed around
``dataset.set_epoch(e)`` only (it re-reads the manifest, plans the epoch and returns its shard ids):

- ``plan only``: ``refresh_manifest`` off — the epoch plan alone (the baseline of the same run);
- ``refresh, unchanged``: the manifest did not change since the last epoch;
- ``refresh, +100 shards``: before each round (untimed) a build-like write adds 100 shards to the manifest;
- ``refresh, +100 shards, held out``: the same, with 10 held-out shard ids that never join (a training run's
  evaluation shards), so the refreshed store is a restricted copy of the table.

And ``set_epoch`` without refresh at ``SHARDSTORE_BENCH_EPOCH_MAX_SHARDS`` (default 10^6) shards for both shard
policies. ``extra_info`` holds medians in milliseconds and the targets (refresh with 100 new shards at 10^5:
<= 50 ms; set_epoch at 10^6: <= 1 ms).
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import numpy as np
import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from shardstore.dataset.subset import RandomShardSubsetCachedDataset
from shardstore.store.manifest import FieldSpec, Manifest, empty_columns
from shardstore.store.reader import ShardStore
from shardstore.store.snapshot import write_manifest

SHARDS = int(os.environ.get("SHARDSTORE_BENCH_GROWTH_SHARDS", 10**5))
BIG = int(os.environ.get("SHARDSTORE_BENCH_EPOCH_MAX_SHARDS", 10**6))
ROUNDS = int(os.environ.get("SHARDSTORE_BENCH_GROWTH_ROUNDS", 20))
SAMPLES = 2048
GROWTH = 100
FIELDS = {"images": FieldSpec(np.dtype(np.uint8), (3, 64, 64)), "labels": FieldSpec(np.dtype(np.int64), ())}


def _table(num_shards: int, generation: int = 0, since: np.ndarray | None = None) -> Manifest:
    cols = empty_columns(FIELDS, num_shards)
    cols["id"][:] = np.arange(num_shards)
    cols["samples"][:] = SAMPLES
    cols["since"][:] = 0 if since is None else since
    for name in FIELDS:
        cols[f"{name}.offset"][:] = 128
        cols[f"{name}.mtime_ns"][:] = 1
    cols["labels.min"][:] = 0
    cols["labels.max"][:] = 9
    return Manifest(FIELDS, columns=cols, generation=generation)


def _grow(root: Path, num_shards: int, generation: int) -> None:
    """What a build does when ``GROWTH`` shards appeared: a new snapshot with them (``since`` = its generation)."""
    since = np.zeros(num_shards + GROWTH, np.uint32)
    since[num_shards:] = generation
    write_manifest(root, _table(num_shards + GROWTH, generation, since))


def _median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1e3, 3)


@pytest.mark.parametrize("case", ["plan only", "refresh, unchanged", "refresh, +100 shards",
                                  "refresh, +100 shards, held out"])
def test_set_epoch_on_a_growing_cache(benchmark: BenchmarkFixture, tmp_path: Path, case: str) -> None:
    root = tmp_path / "cache"
    root.mkdir()
    write_manifest(root, _table(SHARDS))
    held = np.arange(0, SHARDS, max(1, SHARDS // 10))[:10] if "held out" in case else None
    store = ShardStore.open(root)
    if held is not None:
        store = store.subset(np.flatnonzero(~np.isin(store.shard_ids, held)))
    ds = RandomShardSubsetCachedDataset(store, 15, 42, batch_size=64, refresh_manifest=case != "plan only",
                                        held_out_ids=held)
    state = {"epoch": 0, "shards": SHARDS, "generation": 0}
    times: list[float] = []

    def setup() -> tuple[tuple, dict]:
        if "+100" in case:
            state["generation"] += 1
            _grow(root, state["shards"], state["generation"])
            state["shards"] += GROWTH
        state["epoch"] += 1
        return (), {}

    def run() -> None:
        start = time.perf_counter()
        shards = ds.set_epoch(state["epoch"])
        times.append(time.perf_counter() - start)
        assert len(shards) == 15

    benchmark.pedantic(run, setup=setup, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    if "+100" in case:
        assert ds.store.num_shards == state["shards"] - (0 if held is None else held.size)
        assert ds.store.generation == state["generation"]
    benchmark.extra_info.update({"case": case, "shards": SHARDS, "median_ms": _median_ms(times),
                                 "max_ms": round(max(times) * 1e3, 3), "target_ms": 50})


@pytest.mark.parametrize("policy", ["random", "permutation"])
def test_set_epoch_at_the_largest_size(benchmark: BenchmarkFixture, tmp_path: Path, policy: str) -> None:
    root = tmp_path / "cache"
    root.mkdir()
    write_manifest(root, _table(BIG))
    ds = RandomShardSubsetCachedDataset(ShardStore.open(root), 15, 42, policy, batch_size=64)
    epoch = iter(range(1, 10**9))
    times: list[float] = []

    def run() -> None:
        start = time.perf_counter()
        ds.set_epoch(next(epoch))
        times.append(time.perf_counter() - start)

    benchmark.pedantic(run, rounds=max(ROUNDS, 5), iterations=1, warmup_rounds=1)
    benchmark.extra_info.update({"policy": policy, "shards": BIG, "median_ms": _median_ms(times), "target_ms": 1})
