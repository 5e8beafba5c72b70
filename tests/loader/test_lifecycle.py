"""Threads stop on break, errors, KeyboardInterrupt, close and garbage collection; thread errors reach the consumer."""

from __future__ import annotations

import _thread
import gc
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from shardstore import CorruptShardError, ShardStore
from shardstore.dataset.subset import RandomShardSubsetCachedDataset
from shardstore.loader import ShardLoader
from shardstore.loader.pipeline import LoaderRestarted
from shardstore.sampling.plan import RankPlan

from .conftest import loader_threads, write_gid_cache


def make(store: ShardStore, **kwargs) -> RandomShardSubsetCachedDataset:
    return RandomShardSubsetCachedDataset(store, kwargs.pop("k", 6), 3, batch_size=kwargs.pop("batch_size", 4),
                                          **kwargs)


def no_threads_within(seconds: float = 2.0) -> bool:
    deadline = time.monotonic() + seconds
    while loader_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    return not loader_threads()


def test_break_stops_the_threads(store: ShardStore) -> None:
    loader = ShardLoader(make(store))
    for i, _ in enumerate(loader):
        assert loader_threads()
        if i == 2:
            break
    assert no_threads_within()
    assert sum(1 for _ in loader) == len(loader)  # and the loader still works afterwards
    loader.close()
    assert no_threads_within()


def test_an_error_in_the_loop_body_stops_the_threads(store: ShardStore) -> None:
    loader = ShardLoader(make(store))
    with pytest.raises(ZeroDivisionError):
        for _ in loader:
            1 / 0
    assert no_threads_within()


def test_keyboard_interrupt_in_the_loop_body_stops_the_threads(store: ShardStore) -> None:
    loader = ShardLoader(make(store))
    with pytest.raises(KeyboardInterrupt):
        for i, _ in enumerate(loader):
            if i == 1:
                raise KeyboardInterrupt
    assert no_threads_within()


@pytest.mark.slow
def test_keyboard_interrupt_while_waiting_for_data(store: ShardStore) -> None:
    """Ctrl-C reaches a consumer blocked on a slow loader, and the threads stop."""
    ds = make(store)
    slow_plan = ds.rank_plan
    storage_back = threading.Event()

    def rank_plan(epoch: int, start_batch: int = 0) -> RankPlan:
        storage_back.wait(3)  # a planning thread stuck on slow storage until the test lets it go
        return slow_plan(epoch, start_batch)

    ds.rank_plan = rank_plan
    loader = ShardLoader(ds)
    timer = threading.Timer(0.3, _thread.interrupt_main)
    timer.start()
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        for _ in loader:
            pass
    assert time.monotonic() - start < 2.0  # the consumer did not wait for the plan to finish
    storage_back.set()  # the stuck thread finishes its plan and must then stop by itself
    timer.join()
    assert no_threads_within(5)


@pytest.mark.slow  # over 0.3 s
def test_garbage_collection_and_close_stop_the_threads(store: ShardStore) -> None:
    loader = ShardLoader(make(store))
    assert sum(1 for _ in loader) == len(loader)
    assert loader_threads()  # an epoch drained fully: the threads prepare the next one
    del loader
    gc.collect()
    assert no_threads_within()
    with ShardLoader(make(store)) as loader:
        next(iter(loader))
    assert no_threads_within()


def test_a_newer_iteration_overtakes_an_older_one(store: ShardStore) -> None:
    with ShardLoader(make(store)) as loader:
        first = iter(loader)
        next(first)
        second = iter(loader)
        assert next(second) is not None
        with pytest.raises(LoaderRestarted, match="overtaken by a newer one"):
            next(first)


def test_a_shard_deleted_under_the_loader_is_named(tmp_path: Path) -> None:
    root = write_gid_cache(tmp_path / "cache")
    store = ShardStore.open(root)
    ds = make(store, k=None, batch_size=8)
    visited = ds.selected_shards
    victim_position = int(np.flatnonzero(store.shard_ids == visited[-1])[0])
    victim = store.path(victim_position, "image")
    os.remove(victim)  # after the manifest was checked, before the loader maps it
    loader = ShardLoader(ds, read_ahead_shards=0)
    seen = []
    with pytest.raises(CorruptShardError, match=f"{victim}: file listed in the manifest has vanished"):
        for batch in loader:
            seen.append(batch["gid"].clone())
    # Every batch before the one that needs the missing file arrived, correct.
    ids = ds.indices()
    assert seen and all(np.array_equal(b.numpy(), ids[8 * i : 8 * i + 8]) for i, b in enumerate(seen))
    first_missing = int(np.flatnonzero(np.isin(store.locate(ids)[0], [victim_position]))[0])
    assert len(seen) == first_missing // 8
    assert no_threads_within()


def test_gil_switch_interval_is_lowered_while_iterating_and_restored(store: ShardStore) -> None:
    import sys

    before = sys.getswitchinterval()
    with ShardLoader(make(store), gil_switch_interval_s=0.0005) as loader, \
            ShardLoader(make(store), gil_switch_interval_s=0.0005) as other:
        outer = iter(loader)
        next(outer)
        assert sys.getswitchinterval() == pytest.approx(0.0005)
        assert sum(1 for _ in other) == len(other)  # a nested loader ends: the outer one still needs it
        assert sys.getswitchinterval() == pytest.approx(0.0005)
        for _ in outer:
            pass
    assert sys.getswitchinterval() == before
    with ShardLoader(make(store), gil_switch_interval_s=None) as loader:
        next(iter(loader))
        assert sys.getswitchinterval() == before
