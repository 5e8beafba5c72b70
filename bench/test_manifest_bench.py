"""Benchmarks of ``build_manifest``: header scans of many small shards against a plain stat + read loop, incremental
builds (nothing changed, 100 new shards), and full checksums against a sha256 ceiling.

"warm" runs read files already in the page cache (they were just written, and one warm-up
round is run first), so they measure hashing and Python overhead, not the disk. "cold" runs
fsync and evict every file with ``posix_fadvise(DONTNEED)`` before each round, so they
include reading from the disk. The ceiling is plain ``hashlib.sha256`` on one thread over
the same files in 8 MiB chunks; ``build_manifest`` hashes on a few threads, so it can
exceed the ceiling on a machine with several cores. GB/s means 10**9 bytes per second.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from shardstore import BuildReport, ShardWriter, build_manifest, kernels

if TYPE_CHECKING:
    from conftest import BenchCache

CHUNK = 8 << 20
BATCH = 2048  # samples per add_batch call
TINY_SHARD = 4  # samples per shard of the small-shard cache
T = TypeVar("T")
Rate = Callable[..., float | None]  # the ``rate`` fixture of conftest.py
ROUNDS = 3
STATES = ["warm", pytest.param("cold", marks=pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no fadvise"))]


def evict(paths: Sequence[Path]) -> None:
    """Write back and drop the page cache of every file, so the next read comes from the disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def sha256_files(paths: Sequence[Path]) -> list[str]:
    """The ceiling: one thread, plain hashlib, 8 MiB reads into one reused buffer."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    digests = []
    for path in paths:
        h = hashlib.sha256()
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                h.update(view[:n])
        digests.append(f"sha256:{h.hexdigest()}")
    return digests


def run(benchmark: BenchmarkFixture, target: Callable[[], T], state: str, files: Sequence[Path]) -> T:
    """Benchmark ``target`` warm (one warm-up round) or cold (files evicted before each round)."""
    if state == "cold":
        return benchmark.pedantic(target, setup=lambda: evict(files), rounds=ROUNDS)
    return benchmark.pedantic(target, rounds=ROUNDS, warmup_rounds=1)


# -- header scans and incremental builds of a cache of many small shards ---------------------------------------
#
# A real native cache written by ShardWriter (with its journal) of SHARDSTORE_BENCH_SHARDS shards of 4 samples
# (uint8 3x8x8 images, int64 labels): two files per shard, each a header and a few hundred bytes, so a build is
# bound by system calls and Python, not by the disk. Written once per module (the time is in extra_info).

NEW_SHARDS = 100
INCREMENTAL_ROUNDS = 5  # these take about a second: more rounds steady the median on a shared machine
_medians: dict[str, float] = {}  # median seconds of the tests of this module that ran, by name


@dataclass(frozen=True)
class SmallShards:
    root: Path
    num_shards: int
    files: tuple[str, ...]  # every field file, sorted
    written_s: float


def _write_small(root: Path, num_shards: int, start_shard: int = 0) -> None:
    images = np.zeros((BATCH, 3, 8, 8), np.uint8)
    total = num_shards * TINY_SHARD
    with ShardWriter(root, shard_size=TINY_SHARD, start_shard=start_shard, fsync=False, journal=True) as writer:
        for start in range(0, total, BATCH):
            n = min(BATCH, total - start)
            writer.add_batch({"images": images[:n], "labels": np.arange(start, start + n)})


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory: pytest.TempPathFactory) -> SmallShards:
    """SHARDSTORE_BENCH_SHARDS (default 10000) shards of 4 tiny samples, written once for this module."""
    num_shards = int(os.environ.get("SHARDSTORE_BENCH_SHARDS", 10_000))
    root = tmp_path_factory.mktemp("small_shards")
    started = time.perf_counter()
    _write_small(root, num_shards)
    os.sync()  # write back now, so background writeback does not disturb the timed rounds (pages stay cached)
    files = tuple(sorted(os.path.join(d.path, f) for d in os.scandir(root) if d.name.startswith("shard_")
                         for f in ("images.npy", "labels.npy")))
    return SmallShards(root, num_shards, files, time.perf_counter() - started)


def _record(benchmark: BenchmarkFixture, cache: SmallShards, name: str, files: int | None = None) -> None:
    """Median seconds (and files/s) into extra_info and this module's table of medians."""
    benchmark.extra_info["shards"] = cache.num_shards
    benchmark.extra_info["cache written in s"] = round(cache.written_s, 1)
    if benchmark.stats is None:
        return
    median = benchmark.stats.stats.median
    _medians[name] = median
    benchmark.extra_info["median s"] = round(median, 4)
    if files is not None:
        benchmark.extra_info["files/s"] = round(files / median)


def _no_manifest(root: Path) -> None:
    (root / "manifest.json").unlink(missing_ok=True)
    shutil.rmtree(root / "manifest.d", ignore_errors=True)


def stat_and_read(files: Sequence[str]) -> int:
    """The baseline: what a build must learn of each file, in the plainest loop: ``os.stat`` and its first 128 bytes."""
    n = 0
    for path in files:
        os.stat(path)
        fd = os.open(path, os.O_RDONLY)
        n += len(os.read(fd, 128))
        os.close(fd)
    return n


def stat_and_open(files: Sequence[str]) -> int:
    """The same with Python's file objects (``open(path, "rb").read(128)``)."""
    n = 0
    for path in files:
        os.stat(path)
        with open(path, "rb") as f:
            n += len(f.read(128))
    return n


def compiled_reads(root: Path, rel: list[bytes]) -> int:
    """The floor: the system calls a build makes for each file (``open``, ``fstat``, ``pread``, ``close``, relative to
    the open root), in the compiled loop the build uses, with nothing else: no listing, no checks, no table."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        heads = kernels.read_heads(fd, rel, 128)
    finally:
        os.close(fd)
    return int(heads.read.sum())


@pytest.mark.benchmark(group="manifest scan")
@pytest.mark.parametrize("loop", [stat_and_read, stat_and_open], ids=["os.read", "open"])
def test_stat_and_read_baseline(benchmark: BenchmarkFixture, small_shards: SmallShards, loop) -> None:
    cache = small_shards
    assert benchmark.pedantic(lambda: loop(cache.files), rounds=ROUNDS, warmup_rounds=1) == 128 * len(cache.files)
    _record(benchmark, cache, f"baseline {loop.__name__}", len(cache.files))


@pytest.mark.benchmark(group="manifest scan")
def test_compiled_reads_floor(benchmark: BenchmarkFixture, small_shards: SmallShards) -> None:
    """What the build's own system calls cost for these files, without the Python around them."""
    cache = small_shards
    rel = [os.path.relpath(f, cache.root).encode() for f in cache.files]
    got = benchmark.pedantic(lambda: compiled_reads(cache.root, rel), rounds=ROUNDS, warmup_rounds=1)
    assert got == 128 * len(cache.files)
    _record(benchmark, cache, "floor", len(cache.files))
    base = _medians.get("baseline stat_and_read")
    if base is not None and benchmark.stats is not None:
        benchmark.extra_info["of baseline stat_and_read"] = round(base / benchmark.stats.stats.median, 3)


@pytest.mark.benchmark(group="manifest scan")
@pytest.mark.parametrize("mode", ["scratch", "full"])
def test_build_reads_every_header(benchmark: BenchmarkFixture, small_shards: SmallShards, mode: str) -> None:
    """No manifest yet (the journal spares listing each directory), or ``--full`` (every directory listed)."""
    cache = small_shards
    _no_manifest(cache.root)
    report = benchmark.pedantic(lambda: build_manifest(cache.root, incremental=mode == "scratch", write=False),
                                rounds=ROUNDS, warmup_rounds=1)
    assert not report.problems and report.manifest.num_shards == cache.num_shards
    assert report.headers_read == len(cache.files) == 2 * cache.num_shards
    _record(benchmark, cache, mode, len(cache.files))
    for loop in ("stat_and_read", "stat_and_open"):
        base = _medians.get(f"baseline {loop}")
        if base is not None and benchmark.stats is not None:
            benchmark.extra_info[f"of baseline {loop}"] = round(base / benchmark.stats.stats.median, 3)


@pytest.mark.benchmark(group="manifest incremental")
def test_build_with_nothing_changed(benchmark: BenchmarkFixture, small_shards: SmallShards) -> None:
    """One stat per file and shard directory against the table, one header per field: no file written."""
    cache = small_shards
    build_manifest(cache.root)
    report = benchmark.pedantic(lambda: build_manifest(cache.root), rounds=INCREMENTAL_ROUNDS, warmup_rounds=1)
    assert report.unchanged and report.headers_read == 2 and report.files_reused == len(cache.files)
    assert report.paths_compared == len(cache.files) + cache.num_shards  # each file and each shard directory
    _record(benchmark, cache, "unchanged")
    benchmark.extra_info["stat calls"] = report.paths_compared
    benchmark.extra_info["target s"] = 1.0


@pytest.mark.benchmark(group="manifest incremental")
def test_build_with_new_shards(benchmark: BenchmarkFixture, small_shards: SmallShards) -> None:
    """NEW_SHARDS shards written since the last build: their headers read, the table merged and written."""
    cache = small_shards
    added = [cache.root / f"shard_{i:06d}" for i in range(cache.num_shards, cache.num_shards + NEW_SHARDS)]

    def setup() -> None:  # back to the cache as written, built; then the new shards arrive
        for path in added:
            shutil.rmtree(path, ignore_errors=True)
        build_manifest(cache.root)
        _write_small(cache.root, NEW_SHARDS, start_shard=cache.num_shards)

    report = benchmark.pedantic(lambda: build_manifest(cache.root), setup=setup, rounds=INCREMENTAL_ROUNDS)
    assert report.headers_read == 2 * NEW_SHARDS + 2 and report.manifest.num_shards == cache.num_shards + NEW_SHARDS
    assert report.manifest.columns["since"][-NEW_SHARDS:].tolist() == [report.manifest.generation] * NEW_SHARDS
    _record(benchmark, cache, "new shards")
    benchmark.extra_info["new shards"] = NEW_SHARDS
    benchmark.extra_info["target s"] = 1.0
    for path in added:
        shutil.rmtree(path)
    build_manifest(cache.root)


@pytest.mark.benchmark(group="checksum")
@pytest.mark.parametrize("state", STATES)
def test_checksum(benchmark: BenchmarkFixture, rate: Rate, large_cache: BenchCache, state: str) -> None:
    cache = large_cache

    def full() -> BuildReport:
        return build_manifest(cache.root, incremental=False, checksum=True, write=False)

    report = run(benchmark, full, state, cache.files)
    assert not report.problems
    assert report.manifest.num_samples == cache.num_samples
    assert report.files_checksummed == len(cache.files) == 2 * cache.num_shards
    entries = [f for s in report.manifest.shards for f in s.files.values()]
    assert all(f.checksum and f.checksum.startswith("sha256:") for f in entries)
    smallest = min(entries, key=lambda f: f.bytes)
    assert smallest.checksum == sha256_files([cache.root / smallest.path])[0]
    rate("GB/s", report.manifest.total_bytes / 1e9)


@pytest.mark.benchmark(group="checksum")
@pytest.mark.parametrize("state", STATES)
def test_checksum_ceiling(benchmark: BenchmarkFixture, rate: Rate, large_cache: BenchCache, state: str) -> None:
    cache = large_cache
    digests = run(benchmark, lambda: sha256_files(cache.files), state, cache.files)
    assert len(digests) == len(cache.files)
    rate("GB/s", cache.total_bytes / 1e9, vs=f"test_checksum[{state}]")
