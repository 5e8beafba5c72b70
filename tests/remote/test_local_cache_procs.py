"""The local cache shared by several processes of a node: one download per object, the limit held at every
moment, and downloads killed with SIGKILL at random moments."""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import random
import signal
import threading
import time
import traceback
from pathlib import Path

import pytest

from shardstore.remote.local_cache import BOOKKEEPING, LocalCache, disk_usage
from tests.remote.test_local_cache import FakeStore, file_ok, leftovers, make_shard, open_cache

CTX = multiprocessing.get_context("fork")  # children inherit the fake store and the shard lists


def _child(body) -> None:
    """Run ``body()`` in a child; a failure exits 1 with its traceback on stderr."""
    try:
        body()
    except BaseException:  # noqa: BLE001 - reported through the exit code
        traceback.print_exc()
        os._exit(1)
    os._exit(0)


def _start(body) -> multiprocessing.process.BaseProcess:
    process = CTX.Process(target=_child, args=(body,))
    process.start()
    return process


def _join_ok(processes, timeout: float = 120.0) -> None:
    for p in processes:
        p.join(timeout)
        assert p.exitcode == 0, f"child {p.pid} exited with {p.exitcode}"


@pytest.mark.slow
def test_four_processes_fetch_each_object_once(tmp_path: Path) -> None:
    store = FakeStore(tmp_path / "store", delay_s=0.002)
    shards = [make_shard(store, i, (40_000, 20_000, 3_000)) for i in range(6)]
    cache_dir = tmp_path / "cache"
    barrier = CTX.Barrier(4)
    downloaded = CTX.Value("i", 0)

    def fetch(seed: int) -> None:
        cache = open_cache(cache_dir, store, part_size=8192, parallel_parts=2)
        order = list(shards)
        random.Random(seed).shuffle(order)
        barrier.wait()
        for shard in order:
            cache.ensure(shard)
            assert all(file_ok(cache_dir, f) for f in shard.files)
        with downloaded.get_lock():
            downloaded.value += cache.stats.shards_downloaded

    _join_ok([_start(lambda seed=seed: fetch(seed)) for seed in range(4)])
    assert downloaded.value == 6
    for shard in shards:
        for f in shard.files:
            heads = [r for r in store.log() if r[1] == "HEAD" and r[2] == f.key]
            assert len(heads) == 1, f.key
            assert sorted(store.gets(f.key)) == [(s, min(s + 8192, f.size)) for s in range(0, f.size, 8192)]
    assert leftovers(cache_dir) == []


@pytest.mark.slow
def test_usage_never_exceeds_the_limit_while_three_processes_fetch(tmp_path: Path) -> None:
    store = FakeStore(tmp_path / "store", delay_s=0.002)
    sizes = (150_000, 2_000)
    shards = [make_shard(store, i, sizes) for i in range(20)]
    cache_dir = tmp_path / "cache"
    open_cache(cache_dir, store)
    limit = disk_usage(cache_dir) + 5 * 170_000  # less than three pinned and three downloading need: they wait
    evicted = CTX.Value("i", 0)

    def fetch(seed: int) -> None:
        cache = open_cache(cache_dir, store, limit=limit, parallel_parts=2)
        order = list(shards)
        random.Random(seed).shuffle(order)
        for shard in order:
            cache.ensure(shard, pin=True)
            assert all(file_ok(cache_dir, f) for f in shard.files)
            cache.unpin(shard.name)
        with evicted.get_lock():
            evicted.value += cache.stats.evictions

    samples: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        # Sampled under space.lock, every allocation of the cache happening under it too: each sample is a state
        # the directory really was in (a scan racing a rename could see one file twice or not at all).
        fd = os.open(cache_dir / BOOKKEEPING / "space.lock", os.O_RDWR)
        try:
            while not stop.is_set():
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    samples.append(disk_usage(cache_dir))
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                time.sleep(0.002)
        finally:
            os.close(fd)

    watcher = threading.Thread(target=watch)
    children = [_start(lambda seed=seed: fetch(seed)) for seed in range(3)]
    watcher.start()
    try:
        _join_ok(children)
    finally:
        stop.set()
        watcher.join()
    evictions = evicted.value
    print(f"limit {limit:,}: {len(samples)} samples, max {max(samples):,}, {evictions} evictions")
    assert len(samples) > 20 and evictions >= 20 - 5  # every shard fetched at least once, about 5 fit
    assert max(samples) <= limit
    assert disk_usage(cache_dir) <= limit


def _verify_final_files(cache_dir: Path, expected: dict[str, object]) -> int:
    """Every file under a final name passes its size and SHA-256 check; how many there are."""
    count = 0
    for dirpath, dirnames, filenames in os.walk(cache_dir):
        if Path(dirpath) == cache_dir:
            dirnames.remove(BOOKKEEPING)
        for name in filenames:
            key = (Path(dirpath) / name).relative_to(cache_dir).as_posix()
            assert file_ok(cache_dir, expected[key]), key  # type: ignore[arg-type]
            count += 1
    return count


def _download_time(cache_dir: Path, store: FakeStore, shards: list) -> float:
    """Seconds a child takes to fetch ``shards`` from a standing start."""
    ready = CTX.Event()

    def download() -> None:
        cache = open_cache(cache_dir, store, part_size=8192, parallel_parts=2)
        ready.set()
        for shard in shards:
            cache.ensure(shard)

    child = _start(download)
    assert ready.wait(30)
    start = time.monotonic()
    _join_ok([child])
    return time.monotonic() - start


@pytest.mark.slow
@pytest.mark.parametrize("run", range(3))
def test_sigkill_at_random_moments(tmp_path: Path, run: int) -> None:
    """10 kills a run: nothing half-written under a final name; a waiter takes over; a restart completes."""
    store = FakeStore(tmp_path / "store", delay_s=0.004)
    shards = [make_shard(store, i, (60_000, 9_000)) for i in range(3)]
    expected = {f.key: f for s in shards for f in s.files}
    rng = random.Random(20240 + run)
    takeovers: list[float] = []
    midway = 0
    span = _download_time(tmp_path / "calibration", store, shards)  # kills land inside a download, not after
    for kill in range(10):
        cache_dir = tmp_path / f"cache{kill}"
        ready = CTX.Event()
        with_waiter = kill % 2 == 1

        def download(cache_dir: Path = cache_dir, ready=ready) -> None:
            cache = open_cache(cache_dir, store, part_size=8192, parallel_parts=2)
            ready.set()
            for shard in shards:
                cache.ensure(shard)

        def wait_and_take_over(cache_dir: Path = cache_dir, ready=ready) -> None:
            cache = open_cache(cache_dir, store, part_size=8192, parallel_parts=2)
            ready.wait()
            time.sleep(0.01)  # let the downloader take the first shard's lock
            for shard in shards:
                cache.ensure(shard, timeout=60)

        downloader = _start(download)
        waiter = _start(wait_and_take_over) if with_waiter else None
        assert ready.wait(30)
        time.sleep(rng.uniform(0.0, span))
        os.kill(downloader.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        downloader.join()
        midway += _verify_final_files(cache_dir, expected) < len(expected)
        if waiter is not None:
            _join_ok([waiter])
            late = [t for pid, op, *_, t in store.log() if pid == waiter.pid and op == "GET" and t > killed_at]
            if late:
                takeovers.append(min(late) - killed_at)
        else:
            def restart(cache_dir: Path = cache_dir) -> None:
                cache = open_cache(cache_dir, store)
                for shard in shards:
                    cache.ensure(shard, timeout=60)

            _join_ok([_start(restart)])
        assert _verify_final_files(cache_dir, expected) == len(expected)
        assert leftovers(cache_dir) == []  # the dead download's temporaries went with the shard's next fetch
        assert sorted(os.listdir(cache_dir / BOOKKEEPING / "fetched")) == [s.name for s in shards]
        assert LocalCache(cache_dir, 1 << 30, store).clean() == 0
    print(f"run {run}: {midway} of 10 kills mid-download (download {span:.3f} s); "
          f"takeovers after the kill in {[round(t, 3) for t in takeovers]} s")
    assert all(t < 10 for t in takeovers)  # a dead holder's lock is noticed at the next poll, not at a timeout


def test_a_waiting_process_gets_the_shard_its_peer_fetched(tmp_path: Path) -> None:
    store = FakeStore(tmp_path / "store", delay_s=0.005)
    shard = make_shard(store, 1)
    cache_dir = tmp_path / "cache"
    started = CTX.Event()

    def fetch() -> None:
        cache = open_cache(cache_dir, store, parallel_parts=1)
        started.set()
        cache.ensure(shard)

    peer = _start(fetch)
    assert started.wait(30)
    cache = open_cache(cache_dir, store)
    cache.ensure(shard, may_download=False, timeout=60)  # a DataLoader worker: waits, never downloads
    _join_ok([peer])
    assert all(file_ok(cache_dir, f) for f in shard.files)
    assert {pid for pid, *_ in store.log()} == {peer.pid}
