"""Synthetic caches for the benchmarks, sized by SHARDSTORE_BENCH_SHARDS, SHARDSTORE_BENCH_CHECKSUM_MB and
SHARDSTORE_BENCH_LOADER_SHARDS."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from shardstore import ShardWriter, build_manifest

RATES = pytest.StashKey[dict[str, tuple[float, str]]]()
TINY_SHARD = 4  # samples per shard of the header-only cache
BATCH = 2048  # samples per add_batch call


@dataclass(frozen=True)
class BenchCache:
    """A cache written for a benchmark, with what the manifest built from it must show."""

    root: Path
    num_shards: int
    num_samples: int
    files: tuple[Path, ...]  # every field file, sorted

    @property
    def total_bytes(self) -> int:
        """Bytes of all field files."""
        return sum(p.stat().st_size for p in self.files)


def _env_int(name: str, default: int) -> int:
    value = int(os.environ.get(name, default))
    if value < 1:
        raise pytest.UsageError(f"{name} must be a positive integer, got {value}")
    return value


def _write(root: Path, shard_size: int, num_samples: int,
           batch: Callable[[int, int], dict[str, np.ndarray]]) -> BenchCache:
    with ShardWriter(root, shard_size=shard_size, fsync=False) as writer:
        for start in range(0, num_samples, BATCH):
            writer.add_batch(batch(start, min(BATCH, num_samples - start)))
    os.sync()  # write back now, so background writeback does not disturb the timed rounds (pages stay cached)
    files = tuple(sorted(root.glob("shard_*/*.npy")))
    return BenchCache(root, -(-num_samples // shard_size), num_samples, files)


@pytest.fixture(scope="session")
def many_shards_cache(tmp_path_factory: pytest.TempPathFactory) -> BenchCache:
    """SHARDSTORE_BENCH_SHARDS (default 10000) shards of 4 tiny samples each: a header-bound scan."""
    num_shards = _env_int("SHARDSTORE_BENCH_SHARDS", 10_000)
    images = np.zeros((BATCH, 3, 8, 8), np.uint8)

    def batch(start: int, n: int) -> dict[str, np.ndarray]:
        return {"images": images[:n], "labels": np.arange(start, start + n)}

    return _write(tmp_path_factory.mktemp("many_shards"), TINY_SHARD, num_shards * TINY_SHARD, batch)


@pytest.fixture(scope="session")
def large_cache(tmp_path_factory: pytest.TempPathFactory) -> BenchCache:
    """About SHARDSTORE_BENCH_CHECKSUM_MB MiB (default 1024) of uint8 3x64x64 images in shards of 2048."""
    total = _env_int("SHARDSTORE_BENCH_CHECKSUM_MB", 1024) << 20
    images = np.random.default_rng(0).integers(0, 256, (BATCH, 3, 64, 64), np.uint8)
    per_sample = images[0].nbytes + np.dtype(np.int64).itemsize

    def batch(start: int, n: int) -> dict[str, np.ndarray]:
        return {"images": images[:n], "labels": np.arange(start, start + n)}

    return _write(tmp_path_factory.mktemp("large"), 2048, max(1, total // per_sample), batch)


@pytest.fixture(scope="session")
def loader_cache(tmp_path_factory: pytest.TempPathFactory) -> BenchCache:
    """SHARDSTORE_BENCH_LOADER_SHARDS (default 64) shards of 2048 random uint8 3x64x64 images and int64 labels,
    with a manifest: about 25 MB per shard, 1.6 GB at the default size."""
    num_shards = _env_int("SHARDSTORE_BENCH_LOADER_SHARDS", 64)
    rng = np.random.default_rng(1)
    shape = (3, 64, 64)

    def batch(start: int, n: int) -> dict[str, np.ndarray]:
        # Fresh random bytes for every shard: no two shards share pages, and nothing compresses.
        images = np.frombuffer(rng.bytes(n * int(np.prod(shape))), np.uint8).reshape(n, *shape)
        return {"images": images, "labels": rng.integers(0, 1000, n, dtype=np.int64)}

    root = tmp_path_factory.mktemp("loader")
    cache = _write(root, 2048, num_shards * 2048, batch)
    build_manifest(root)
    return cache


@pytest.fixture
def rate(benchmark: BenchmarkFixture, request: pytest.FixtureRequest) -> Callable[..., float | None]:
    """``rate(unit, amount, vs=None)``: amount per median second, into extra_info; None when benchmarks are disabled.

    With ``vs`` (the name of a test that ran before), also record that test's rate divided by this one.
    """

    def record(unit: str, amount: float, vs: str | None = None) -> float | None:
        if benchmark.stats is None:
            return None
        value = amount / benchmark.stats.stats.median
        rates = request.config.stash.setdefault(RATES, {})
        benchmark.extra_info[unit] = round(value, 3)
        text = f"{value:,.3f} {unit}"
        if vs in rates:
            ratio = rates[vs][0] / value
            benchmark.extra_info[f"{vs} / this"] = round(ratio, 3)
            text += f"  ({vs} is {ratio:.2f}x this)"
        rates[request.node.name] = (value, text)
        return value

    return record


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    """Print the throughputs after the timing table."""
    rates = config.stash.get(RATES, {})
    if rates:
        terminalreporter.section("throughput (median round)")
        for name, (_, text) in rates.items():
            terminalreporter.write_line(f"{name:<40} {text}")
