"""Throughput of ``ShardLoader`` against the DataLoader designs it replaced, and against the machine's ceilings.

The cache (``loader_cache`` in conftest.py) holds SHARDSTORE_BENCH_LOADER_SHARDS shards
(default 64, about 1.6 GB) of 2048 random uint8 3x64x64 images with int64 labels. Every
case reads one epoch's worth of samples (``min(15, shards)`` shards, batches of 64) and
the consumer only counts them, so the cases differ in the reader alone:

* ``shardloader_t1`` / ``shardloader_t2``: ``ShardLoader`` with 1 / 2 gather threads;
* ``random_ids_w0`` / ``random_ids_w2``: the design it replaced, random sample ids over the
  whole cache through ``DataLoader`` (``num_workers`` 0 / 2);
* ``subset_dataloader_w2``: the same epoch as the loader's, through a plain ``DataLoader``
  (2 workers, the dataset's order);
* ceilings: one NumPy copy of 1 GiB into a pre-touched destination (warm), and a cold
  sequential read of the epoch's files in 8 MiB chunks (cold).

"warm": every file of the cache is read once first and one untimed epoch runs before the
rounds (maps set up, persistent workers started); the reader is kept between rounds.
"cold": before each round the previous reader is closed and collected, the files are
dropped from the page cache with posix_fadvise(DONTNEED) (checked with mincore), and a new
reader is built. ``test_epoch_boundary`` runs consecutive epochs through one loader and
records how long the first batch of each epoch keeps the consumer waiting, with the
counting consumer and with one that is slower than the loader.

SHARDSTORE_BENCH_LOADER_ROUNDS (default 5) sets the rounds, SHARDSTORE_BENCH_LOADER_EPOCHS
(default 4) the epochs per round of the boundary test and SHARDSTORE_BENCH_LOADER_STEP_US
(default 300) the per-batch sleep of its slow consumer. ``bench/report.py`` turns the
``--benchmark-json`` output into a table. MB and GB are 10**6 and 10**9 bytes.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
from pytest_benchmark.fixture import BenchmarkFixture

from loader_cases import (
    BATCH_SIZE,
    CASES,
    CHUNK,
    EPOCH,
    SEED,
    Case,
    Epoch,
    cached_bytes,
    consume,
    describe_epoch,
    make_case,
    make_cold,
    pre_read,
)
from shardstore import ShardStore
from shardstore.dataset.subset import RandomShardSubsetCachedDataset
from shardstore.loader import ShardLoader
from shardstore.loader.slots import chunk_batches

if TYPE_CHECKING:
    from conftest import BenchCache

Rate = Callable[..., float | None]  # the ``rate`` fixture of conftest.py


def _env_int(name: str, default: int, low: int = 1) -> int:
    value = int(os.environ.get(name, default))
    if value < low:
        raise pytest.UsageError(f"{name} must be an integer >= {low}, got {value}")
    return value


ROUNDS = _env_int("SHARDSTORE_BENCH_LOADER_ROUNDS", 5)
EPOCHS = _env_int("SHARDSTORE_BENCH_LOADER_EPOCHS", 4, low=2)
#: The slow consumers of the boundary test spend this long on each batch.
STEP_S = _env_int("SHARDSTORE_BENCH_LOADER_STEP_US", 300) / 1e6
MEMCPY_BYTES = 1 << 30
MODES = ["warm", pytest.param("cold", marks=pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no fadvise"))]


@pytest.fixture(scope="module")
def epoch(loader_cache: BenchCache) -> Epoch:
    return describe_epoch(loader_cache.root, min(15, loader_cache.num_shards))


def record(benchmark: BenchmarkFixture, rate: Rate, *, case: str, mode: str, kind: str, samples: int,
           nbytes: int, **extra: object) -> None:
    """What report.py reads: the case, its mode, and the amounts one round moves."""
    benchmark.extra_info.update(case=case, mode=mode, kind=kind, samples=samples, bytes=nbytes, **extra)
    rate("MB_per_s", nbytes / 1e6)
    rate("samples_per_s", samples)


def bench_case(benchmark: BenchmarkFixture, case: Case, mode: str, rounds: int) -> tuple[list[int], list[int]]:
    """Time ``rounds`` epochs of ``case``.

    Returns the samples each round handed to the consumer and, cold, the bytes of the cache
    in the page cache after each round: what the round read from the disk, read-ahead included.
    """
    counts: list[int] = []
    cached: list[int] = []

    def run() -> None:
        counts.append(case.run())

    if mode == "cold":
        # Cold: a new reader per round. DataLoader workers are not persistent: they start
        # (fork) inside the timed round, as on the first epoch of a run.
        def setup() -> None:
            if counts:
                cached.append(cached_bytes(case.epoch.all_files))
            case.close()  # the previous round's reader: its threads, maps and worker processes
            make_cold(case.epoch.all_files, case.files)
            case.open()
    else:
        # Warm: one reader for every round. One untimed epoch first maps the files and starts
        # the DataLoader workers, which are persistent, so no round times worker start-up.
        def setup() -> None:
            if case.reader is None:
                pre_read(case.epoch.all_files)
                case.open()
                counts.append(case.run())

    try:
        benchmark.pedantic(run, setup=setup, rounds=rounds, iterations=1)
        if mode == "cold":
            cached.append(cached_bytes(case.epoch.all_files))
    finally:
        case.close()
    return counts, cached


@pytest.mark.benchmark(group="loader epoch")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("key", list(CASES))
def test_loader(benchmark: BenchmarkFixture, rate: Rate, epoch: Epoch, key: str, mode: str) -> None:
    case = make_case(key, epoch, mode)
    counts, cached = bench_case(benchmark, case, mode, ROUNDS)
    assert counts, "no round ran"
    assert all(n == epoch.num_samples for n in counts), f"{case.name} handed out {counts}, not {epoch.num_samples}"
    extra: dict[str, object] = {"name": case.name, "shards_read": len({p.parent for p in case.files})}
    if isinstance(wait := getattr(case, "wait_s", None), list) and wait:
        extra["consumer_wait_s"] = round(float(np.median(wait)), 6)
    if cached:
        extra["cached_after_round_MB"] = round(float(np.median(cached)) / 1e6, 1)
    record(benchmark, rate, case=key, mode=mode, kind="loader", samples=epoch.num_samples, nbytes=epoch.bytes,
           **extra)


# -- ceilings ---------------------------------------------------------------------------------


@pytest.mark.benchmark(group="ceiling")
def test_ceiling_memcpy(benchmark: BenchmarkFixture, rate: Rate, epoch: Epoch) -> None:
    """One NumPy copy of 1 GiB between two touched buffers (64 MiB when benchmarks are disabled)."""
    n = (64 << 20) if benchmark.disabled else MEMCPY_BYTES
    src = np.empty(n, np.uint8)
    src.fill(0x5A)
    dst = np.empty(n, np.uint8)
    dst.fill(0)  # pre-touched: the copy pays no page faults
    benchmark.pedantic(np.copyto, args=(dst, src), rounds=ROUNDS, iterations=1, warmup_rounds=1)
    assert dst[0] == dst[-1] == 0x5A
    record(benchmark, rate, case="memcpy", mode="warm", kind="ceiling", samples=n // epoch.sample_bytes, nbytes=n)
    rate("GB_per_s", n / 1e9)


def read_files(paths: tuple[os.PathLike[str], ...], buf: bytearray) -> int:
    """Read every file front to back in ``len(buf)`` chunks; the bytes read."""
    total = 0
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    return total


@pytest.mark.benchmark(group="ceiling")
@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no fadvise")
def test_ceiling_sequential_read_cold(benchmark: BenchmarkFixture, rate: Rate, epoch: Epoch) -> None:
    """The epoch's files, evicted, read sequentially in 8 MiB chunks into one preallocated buffer."""
    buf = bytearray(CHUNK)
    got: list[int] = []
    benchmark.pedantic(lambda: got.append(read_files(epoch.files, buf)),
                       setup=lambda: make_cold(epoch.files, epoch.files), rounds=ROUNDS, iterations=1)
    size = epoch.file_bytes
    assert got and all(n == size for n in got)
    record(benchmark, rate, case="sequential_read", mode="cold", kind="ceiling", samples=epoch.num_samples,
           nbytes=size)
    rate("GB_per_s", size / 1e9)


# -- epoch boundaries -------------------------------------------------------------------------


def sleeping(batches: Iterable[dict[str, torch.Tensor]]) -> int:
    """Slower than the loader: counts each batch, then sleeps STEP_S with the GIL released (a trainer
    waiting on its GPU)."""
    n = 0
    for batch in batches:
        n += batch["labels"].shape[0]
        time.sleep(STEP_S)
    return n


def busy(batches: Iterable[dict[str, torch.Tensor]]) -> int:
    """Slower than the loader: counts each batch, then runs Python for STEP_S, holding the GIL (a trainer
    busy in Python between batches)."""
    n = 0
    for batch in batches:
        n += batch["labels"].shape[0]
        end = time.perf_counter() + STEP_S
        while time.perf_counter() < end:
            pass
    return n


CONSUMERS = {"count": consume, "sleep": sleeping, "busy": busy}


@pytest.mark.benchmark(group="epoch boundary")
@pytest.mark.parametrize("consumer", list(CONSUMERS))
@pytest.mark.parametrize("threads", [1, 2])
def test_epoch_boundary(benchmark: BenchmarkFixture, rate: Rate, epoch: Epoch, threads: int, consumer: str) -> None:
    """EPOCHS consecutive epochs per round through one loader (warm); how long each epoch's first batch waits.

    The epochs of a round follow each other with no pause (``set_epoch(e + 1)`` right after
    the last batch of ``e``), so only the loader's preparation of the next epoch can hide
    the boundary. The waits of every epoch but the first of a round (which follows the pause
    between rounds) are kept: each first batch against the median batch, and against the
    batches that start a chunk (where the consumer waits for a whole chunk of batches).

    ``count`` is the consumer of the throughput cases, so the loader is the bottleneck and
    every chunk keeps the consumer waiting; ``sleep`` and ``busy`` spend STEP_S per batch
    (more than the loader needs), so a loader that keeps up has every batch ready, the first
    of an epoch included. ``busy`` holds the GIL meanwhile, as Python work in a training
    step does; the loader's threads need it between their GIL-free copies.
    """
    pre_read(epoch.all_files)
    ds = RandomShardSubsetCachedDataset(ShardStore.open(epoch.root), epoch.shards_per_epoch, SEED,
                                        batch_size=BATCH_SIZE)
    loader = ShardLoader(ds, num_threads=threads)
    chunk = chunk_batches(ds.store.fields, BATCH_SIZE)
    read = CONSUMERS[consumer]
    next_epoch = itertools.count(EPOCH)
    waits: list[np.ndarray] = []  # per-batch waits of the epochs that directly follow another
    epoch_s: list[float] = []  # time of each of those epochs, as the consumer saw it
    iterations = 0

    def one_epoch() -> tuple[int, np.ndarray]:
        nonlocal iterations
        loader.set_epoch(next(next_epoch))
        n = read(loader)
        iterations += 1
        return n, loader.stats.per_batch_s

    def run() -> None:
        for k in range(EPOCHS):
            start = time.perf_counter()
            n, w = one_epoch()
            elapsed = time.perf_counter() - start
            assert n == epoch.num_samples, f"epoch handed out {n} samples, not {epoch.num_samples}"
            if k:
                waits.append(w)
                epoch_s.append(elapsed)

    try:
        one_epoch()  # untimed: the loader's first iteration is a fresh start, not a boundary
        benchmark.pedantic(run, rounds=ROUNDS, iterations=1)
        warm_starts = loader.warm_starts
    finally:
        loader.close()
    # Every iteration after the first found its epoch already in preparation.
    assert warm_starts == iterations - 1, f"{warm_starts} of {iterations - 1} epochs were prepared ahead"
    assert waits
    first = np.array([w[0] for w in waits])
    rest = np.concatenate([w[1:] for w in waits])
    chunk_starts = np.concatenate([w[chunk::chunk] for w in waits])
    every = np.concatenate(waits)

    def us(x: float) -> float:
        return round(float(x) * 1e6, 1)

    record(benchmark, rate, case=f"shardloader_t{threads}_{consumer}", mode="warm", kind="boundary",
           samples=EPOCHS * epoch.num_samples, nbytes=EPOCHS * epoch.bytes, name=f"ShardLoader threads={threads}",
           consumer=consumer, step_us=us(STEP_S) if consumer != "count" else 0.0, epochs_per_round=EPOCHS,
           batches_per_chunk=chunk, boundaries=int(first.size),
           first_batch_wait_us=[us(x) for x in first],
           first_batch_wait_median_us=us(np.median(first)),
           first_batch_wait_max_us=us(first.max()),
           median_batch_wait_us=us(np.median(every)),
           chunk_start_wait_median_us=us(np.median(chunk_starts)) if chunk_starts.size else 0.0,
           p90_batch_wait_us=us(np.percentile(every, 90)),
           max_other_batch_wait_us=us(rest.max()) if rest.size else 0.0,
           wait_share=round(float(sum(w.sum() for w in waits) / sum(epoch_s)), 4),
           warm_starts=warm_starts)
