"""``set_epoch``'s planning cost against the number of shards, and the compiled epoch map against its NumPy twin.

Planning an epoch is ``plan_epoch`` (shard policy, order policy) plus the epoch map
(``expand_epoch``: global sample ids in read order), for ``shards_per_epoch`` 15 of a
synthetic cache of N shards of 2048 samples (counts and offsets only: no files), N = 10^2
.. ``SHARDSTORE_BENCH_EPOCH_MAX_SHARDS`` (default 10^6). Every round plans the next epoch,
so cycle boundaries and rearranged heads are included; reads in file order, plus one case
per policy at the largest N interleaving 4 shards at a time. ``extra_info`` holds the median in
microseconds, the time relative to N = 100 of the same policy (1.0: independent of N), the
shard policy, the order policy and the map alone, and, for ``permutation``, the cost of one whole-cache
``Generator.permutation`` (what schedule 1 paid every epoch) divided by this epoch's.

The map is compared with ``shardstore.reference.expand_epoch`` at 15 x 2048 and 122 x 2048
samples, in file order and interleaved by 4 (``speedup``: reference time / compiled time,
medians of the same run).
"""

from __future__ import annotations

import itertools
import os
import statistics
import time
from collections.abc import Callable

import numpy as np
import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from shardstore import kernels, reference
from shardstore.sampling.order import ORDER_POLICIES
from shardstore.sampling.plan import EpochSpec, plan_epoch
from shardstore.sampling.seeds import PERMUTATION, rng_for
from shardstore.sampling.shards import SHARD_POLICIES

SHARD_SIZE = 2048
PER_EPOCH = 15
MAX_SHARDS = int(os.environ.get("SHARDSTORE_BENCH_EPOCH_MAX_SHARDS", 10**6))
if MAX_SHARDS < 1:
    raise pytest.UsageError(f"SHARDSTORE_BENCH_EPOCH_MAX_SHARDS must be a positive integer, got {MAX_SHARDS}")
SIZES = [n for n in (10**2, 10**3, 10**4, 10**5, 10**6) if n <= MAX_SHARDS] or [MAX_SHARDS]
Rate = Callable[..., "float | None"]  # the ``rate`` fixture of conftest.py


def median_us(fn: Callable[[], object], repeats: int = 200) -> float:
    """Median wall time of ``fn`` in microseconds over ``repeats`` calls (one untimed call first)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def cache(num_shards: int) -> tuple[np.ndarray, np.ndarray]:
    counts = np.full(num_shards, SHARD_SIZE, dtype=np.int64)
    return counts, np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def set_epoch(counts: np.ndarray, offsets: np.ndarray, spec: EpochSpec, epoch: int) -> np.ndarray:
    """What ``set_epoch`` computes before any sample is read: the plan and its global read order."""
    return plan_epoch(counts, offsets, spec, epoch).order


@pytest.mark.parametrize("num_shards", SIZES)
@pytest.mark.parametrize("policy", ["random", "permutation"])
def test_set_epoch_cost(benchmark: BenchmarkFixture, rate: Rate, policy: str, num_shards: int) -> None:
    run_set_epoch(benchmark, rate, policy, num_shards, "sequential")


@pytest.mark.parametrize("policy", ["random", "permutation"])
def test_set_epoch_cost_interleaved(benchmark: BenchmarkFixture, rate: Rate, policy: str) -> None:
    """The largest cache with ``sample_order: interleave`` (4 shards at a time): what the order policy adds."""
    run_set_epoch(benchmark, rate, policy, SIZES[-1], "interleave")


def run_set_epoch(benchmark: BenchmarkFixture, rate: Rate, policy: str, num_shards: int, order: str) -> None:
    counts, offsets = cache(num_shards)
    spec = EpochSpec(shards_per_epoch=PER_EPOCH, random_subset_seed=42, shard_policy=policy, sample_order=order,
                     active_shards=4)
    epochs = itertools.count()
    ids = benchmark(lambda: set_epoch(counts, offsets, spec, next(epochs)))
    assert ids.size == min(PER_EPOCH, num_shards) * SHARD_SIZE
    rate("epochs/s", 1, vs=f"test_set_epoch_cost[{policy}-{SIZES[0]}]")  # this time / the smallest cache's
    if benchmark.stats is None:
        return
    info = benchmark.extra_info
    info["median_us"] = round(benchmark.stats.stats.median * 1e6, 1)
    epochs_policy = itertools.count()
    info["shard_policy_us"] = round(median_us(lambda: SHARD_POLICIES[policy](
        num_shards, PER_EPOCH, 42, next(epochs_policy))), 1)
    positions = SHARD_POLICIES[policy](num_shards, PER_EPOCH, 42, 0)
    visit_counts, starts = counts[positions], offsets[positions]
    source = ORDER_POLICIES[order](visit_counts, 42, 0, 4)
    info["order_policy_us"] = round(median_us(lambda: ORDER_POLICIES[order](visit_counts, 42, 0, 4)), 1)
    info["epoch_map_us"] = round(median_us(lambda: kernels.expand_epoch(starts, visit_counts, source)), 1)
    if policy == "permutation":
        whole = median_us(lambda: rng_for(42, 0, PERMUTATION).permutation(num_shards), repeats=20)
        info["whole_cache_permutation_us"] = round(whole, 1)
        info["whole_cache_permutation / this"] = round(whole / info["median_us"], 2)


SAMPLE_CASES = [(shards, order) for shards in (15, 122) for order in ("sequential", "interleave")]


@pytest.mark.parametrize(("shards", "order"), SAMPLE_CASES)
def test_epoch_map_compiled_vs_reference(benchmark: BenchmarkFixture, rate: Rate, shards: int, order: str) -> None:
    counts, offsets = cache(shards)
    positions = np.random.default_rng(0).permutation(shards)
    visit_counts, starts = counts[positions], offsets[positions]
    source = ORDER_POLICIES[order](visit_counts, 42, 0, 4)
    got = benchmark(lambda: kernels.expand_epoch(starts, visit_counts, source))
    assert np.array_equal(got, reference.expand_epoch(starts, visit_counts, source))
    rate("samples/s", got.size)
    if benchmark.stats is None:
        return
    compiled = benchmark.stats.stats.median * 1e6
    ref = median_us(lambda: reference.expand_epoch(starts, visit_counts, source),
                    repeats=5 if source is not None else 50)
    benchmark.extra_info.update(samples=int(got.size), median_us=round(compiled, 1), reference_us=round(ref, 1),
                                speedup=round(ref / compiled, 1))
