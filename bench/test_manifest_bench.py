"""Benchmarks of ``build_manifest``: header-only scans of many shards, and full checksums against a sha256 ceiling.

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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from shardstore import BuildReport, build_manifest

if TYPE_CHECKING:
    from conftest import BenchCache

CHUNK = 8 << 20
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


@pytest.mark.benchmark(group="manifest scan")
def test_scan_headers(benchmark: BenchmarkFixture, rate: Rate, many_shards_cache: BenchCache) -> None:
    cache = many_shards_cache
    report = benchmark.pedantic(lambda: build_manifest(cache.root, incremental=False, write=False), rounds=ROUNDS)
    assert not report.problems
    assert len(report.manifest.shards) == cache.num_shards
    assert report.manifest.num_samples == cache.num_samples
    assert report.headers_read == len(cache.files) == 2 * cache.num_shards
    rate("shards/s", cache.num_shards)


@pytest.mark.benchmark(group="manifest scan")
def test_scan_incremental(benchmark: BenchmarkFixture, rate: Rate, many_shards_cache: BenchCache) -> None:
    cache = many_shards_cache
    build_manifest(cache.root)
    report = benchmark.pedantic(lambda: build_manifest(cache.root, write=False), rounds=ROUNDS)
    assert not report.problems
    assert len(report.manifest.shards) == cache.num_shards
    assert report.headers_read == 2 * cache.num_shards  # every header is re-checked against the old entry
    assert report.files_reused == 2 * cache.num_shards
    rate("shards/s", cache.num_shards)


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
