"""The format-3 store at a million shards: open time and memory, first batch, table size, memory per shard, workers.

Stores are written by ``synthetic_store.py``: the shard table directly as columns, real files
only for the shards epochs 0 and 1 read. Sizes: SHARDSTORE_BENCH_STORE_SHARDS (N, default
10**6) shards of SHARDSTORE_BENCH_STORE_SAMPLES (default 2048) uint8 3x64x64 images and int64
labels; the memory sweep also writes N/100 and N/10 shards, and the format-2 comparison is at
N/10. SHARDSTORE_BENCH_STORE_ROUNDS (default 5) fresh processes per timed case.

Open, first batch and memory are measured in fresh interpreters (``synthetic_store.py
PROBE``), after their imports, with the store's files in the page cache: the benchmark's own
timing row is each whole process (interpreter, imports, case), and the case's figures are in
``benchmark.extra_info`` (medians over the rounds, ms and MB = 10**6 bytes). Targets on the
2-core VM: open <= 50 ms and <= 30 MB RSS growth at 10**6 shards; first batch <= 100 ms; table
<= 64 bytes per shard plus the digests; RSS growth per shard a few tens of bytes at most.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from shardstore.store.manifest import DIGEST_BYTES, Manifest
from shardstore.store.snapshot import expected_columns, manifest_path, write_manifest
from synthetic_store import (
    FIELDS,
    SyntheticStore,
    pre_read,
    run_probe,
    table_columns,
    write_format2,
    write_store,
)


def _env_int(name: str, default: int) -> int:
    value = int(os.environ.get(name, default))
    if value < 1:
        raise pytest.UsageError(f"{name} must be a positive integer, got {value}")
    return value


SHARDS = _env_int("SHARDSTORE_BENCH_STORE_SHARDS", 1_000_000)
SAMPLES = _env_int("SHARDSTORE_BENCH_STORE_SAMPLES", 2048)
ROUNDS = _env_int("SHARDSTORE_BENCH_STORE_ROUNDS", 5)
SIZES = {"small": max(1, SHARDS // 100), "medium": max(1, SHARDS // 10), "large": SHARDS}
MB = 1e6
#: What each open probe measured, by (format, size), for the format-2 / format-3 ratio.
OPENED: dict[tuple[int, str], dict[str, float]] = {}
FIRST_BATCH: dict[str, float] = {}


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], SyntheticStore]:
    """``stores(size)``: the synthetic store of SIZES[size] shards, written on first use."""
    made: dict[str, SyntheticStore] = {}

    def get(size: str) -> SyntheticStore:
        if size not in made:
            made[size] = write_store(tmp_path_factory.mktemp(f"store_{size}"), SIZES[size], SAMPLES)
        return made[size]

    return get


def _warm(*stores: SyntheticStore) -> None:
    """Read the header, the table and the shard files of ``stores`` into the page cache."""
    for store in stores:
        pre_read([manifest_path(store.root), *store.table_files(), *store.files])


def _rounds(benchmark: BenchmarkFixture, probe: str, *args: str, setup: Callable[[], None]) -> list[dict[str, Any]]:
    """ROUNDS fresh processes of ``probe`` (one when benchmarks are disabled); their results."""
    results: list[dict[str, Any]] = []
    benchmark.pedantic(lambda: results.append(run_probe(probe, *args)), setup=setup, rounds=ROUNDS, iterations=1)
    return results


def _ms(values: list[float]) -> dict[str, float]:
    ms = [v * 1e3 for v in values]
    return {"median": round(statistics.median(ms), 2), "min": round(min(ms), 2), "max": round(max(ms), 2)}


def _mb(values: dict[str, int]) -> dict[str, float]:
    return {k: round(v / MB, 2) for k, v in values.items()}


# -- open ------------------------------------------------------------------------------------


@pytest.mark.benchmark(group="store open")
@pytest.mark.parametrize(("version", "size"), [(3, "large"), (3, "medium"), (2, "medium")],
                         ids=["format3-N", "format3-N/10", "format2-N/10"])
def test_open(benchmark: BenchmarkFixture, stores: Callable[[str], SyntheticStore], tmp_path: Path,
              version: int, size: str) -> None:
    store = stores(size)
    root = store.root
    if version == 2:
        root = tmp_path / "format2"
        write_format2(store, root)
        paths = [manifest_path(root)]
    else:
        paths = [manifest_path(root), *store.table_files()]
    results = _rounds(benchmark, "open", str(root), setup=lambda: pre_read(paths))
    for r in results:
        assert r["num_shards"] == store.num_shards
        assert r["num_samples"] == store.num_shards * SAMPLES
        assert r["format_version"] == version
    opened = {"open_ms": statistics.median(r["open_s"] for r in results) * 1e3,
              "rss_mb": statistics.median(r["rss_touch"]["VmRSS"] for r in results) / MB,
              "peak_mb": statistics.median(r["rss_open"]["VmHWM"] for r in results) / MB}
    OPENED[(version, size)] = opened
    info = benchmark.extra_info
    info.update(shards=store.num_shards, format=version, manifest_bytes=sum(p.stat().st_size for p in paths),
                open_ms=_ms([r["open_s"] for r in results]), touch_ms=_ms([r["touch_s"] for r in results]),
                rss_after_open_mb=_mb(results[-1]["rss_open"]), rss_after_touch_mb=_mb(results[-1]["rss_touch"]),
                target="open <= 50 ms, RSS growth <= 30 MB at 10**6 shards")
    if version == 2 and (3, size) in OPENED:
        three = OPENED[(3, size)]
        info["format2 / format3 open time"] = round(opened["open_ms"] / three["open_ms"], 1)
        info["format2 / format3 RSS growth"] = round(opened["rss_mb"] / three["rss_mb"], 1)
        info["format2 / format3 peak RSS growth"] = round(opened["peak_mb"] / max(three["peak_mb"], 0.01), 1)


# -- first batch -----------------------------------------------------------------------------


@pytest.mark.benchmark(group="first batch")
@pytest.mark.parametrize("size", ["small", "large"], ids=["N/100", "N"])
def test_first_batch(benchmark: BenchmarkFixture, stores: Callable[[str], SyntheticStore], size: str) -> None:
    """Open + ``RandomShardSubsetCachedDataset(store, 15, batch_size=64)`` + the first batch of ``ShardLoader``."""
    store = stores(size)
    results = _rounds(benchmark, "first-batch", str(store.root), setup=lambda: _warm(store))
    assert all(r["batch_ok"] for r in results), "the first batch is not the dataset's first 64 samples"
    assert all(r["num_shards"] == store.num_shards for r in results)
    total = statistics.median(r["total_s"] for r in results) * 1e3
    FIRST_BATCH[size] = total
    info = benchmark.extra_info
    info.update(shards=store.num_shards, samples_per_shard=SAMPLES, total_ms=_ms([r["total_s"] for r in results]),
                target="<= 100 ms at 10**6 shards",
                numpy_random_imported_before=results[0]["numpy_random_imported_before"])
    for part in ("open_s", "dataset_s", "loader_s", "first_batch_s"):
        info[part.replace("_s", "_ms")] = _ms([r[part] for r in results])
    if size == "large" and "small" in FIRST_BATCH:
        info["N / (N/100)"] = round(total / FIRST_BATCH["small"], 2)


# -- the table on disk -----------------------------------------------------------------------


@pytest.mark.benchmark(group="table on disk")
@pytest.mark.parametrize("checksums", [False, True], ids=["plain", "checksums"])
def test_table_bytes(benchmark: BenchmarkFixture, tmp_path: Path, checksums: bool) -> None:
    """Bytes per shard of the table (every column file, headers included); the timing is ``write_manifest``."""
    manifest = Manifest(FIELDS, columns=table_columns(SHARDS, SAMPLES, mtime_ns=1, checksums=checksums))
    benchmark.pedantic(lambda: write_manifest(tmp_path, manifest), rounds=3, iterations=1)
    tables = [p for p in (tmp_path / "manifest.d").iterdir() if p.is_dir()]
    current = tmp_path / json.loads(manifest_path(tmp_path).read_text())["table"]
    assert current in tables
    files = sorted(current.glob("*.npy"))
    digests = list(FIELDS) if checksums else []
    assert {p.name[:-4] for p in files} == set(expected_columns(FIELDS, digests, SHARDS))
    table_bytes = sum(p.stat().st_size for p in files)
    per_shard = table_bytes / SHARDS
    allowed = 64 + DIGEST_BYTES * len(digests)
    benchmark.extra_info.update(shards=SHARDS, columns=len(files), table_bytes=table_bytes,
                                header_bytes=manifest_path(tmp_path).stat().st_size,
                                bytes_per_shard=round(per_shard, 2),
                                target_bytes_per_shard=allowed, met=per_shard <= allowed)
    assert np.array_equal(np.load(current / "id.npy", mmap_mode="r")[-3:], np.arange(SHARDS)[-3:])


# -- memory per shard ------------------------------------------------------------------------


def _slope(low: dict[str, int], high: dict[str, int], shards: tuple[int, int]) -> dict[str, float] | None:
    """Bytes per shard between two sizes (None when they are the same size)."""
    if shards[1] == shards[0]:
        return None
    return {k: round((high[k] - low[k]) / (shards[1] - shards[0]), 2) for k in high}


@pytest.mark.benchmark(group="memory per shard")
def test_epoch_memory(benchmark: BenchmarkFixture, stores: Callable[[str], SyntheticStore]) -> None:
    """RSS growth of store + dataset + ShardLoader(num_threads=2) after one epoch, at N/100, N/10 and N shards."""
    sized = {size: stores(size) for size in SIZES}
    results: dict[str, dict[str, Any]] = {}

    def measure() -> None:
        for size, store in sized.items():
            results[size] = run_probe("epoch-memory", str(store.root))

    benchmark.pedantic(measure, setup=lambda: _warm(*sized.values()), rounds=1, iterations=1)
    for size, r in results.items():
        assert r["num_shards"] == SIZES[size]
        assert r["batches"] == r["steps"] > 0
    info = benchmark.extra_info
    for size, r in results.items():
        info[f"{SIZES[size]} shards"] = {step: _mb(r[step]) for step in ("store", "dataset", "loader", "epoch")}
    span = (SIZES["small"], SIZES["large"])
    info["bytes per shard (N/100 -> N)"] = {
        step: _slope(results["small"][step], results["large"][step], span) for step in ("store", "dataset", "epoch")}
    info["target"] = "a few tens of bytes per shard at most"


@pytest.mark.benchmark(group="memory per shard")
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_dataloader_workers(benchmark: BenchmarkFixture, stores: Callable[[str], SyntheticStore], method: str) -> None:
    """``DataLoader(dataset, batch_size=64, num_workers=2)``: each worker's memory at N/100 and N shards."""
    sized = {size: stores(size) for size in ("small", "large")}
    results: dict[str, dict[str, Any]] = {}

    def measure() -> None:
        for size, store in sized.items():
            results[size] = run_probe("workers", str(store.root), method)

    benchmark.pedantic(measure, setup=lambda: _warm(*sized.values()), rounds=1, iterations=1)
    for r in results.values():
        assert r["batch_ok"], "the DataLoader's first batch is not the dataset's first 64 samples"
        assert len(r["workers"]) == 2
    info = benchmark.extra_info
    for size, r in results.items():
        info[f"{SIZES[size]} shards"] = {"parent": _mb(r["parent"]), "workers": [_mb(w) for w in r["workers"]]}
    span = (SIZES["small"], SIZES["large"])
    info["worker bytes per shard (N/100 -> N)"] = [
        _slope(results["small"]["workers"][i], results["large"]["workers"][i], span) for i in range(2)]
    info["parent bytes per shard (N/100 -> N)"] = _slope(results["small"]["parent"], results["large"]["parent"], span)
