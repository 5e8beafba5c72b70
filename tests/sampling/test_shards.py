"""Shard policies on their own: the keyed bijection, ``permutation``'s cycles against a plain walk, and sizes up
to a million shards without any array the size of the cache."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardstore.sampling import shards
from shardstore.sampling.seeds import VISIT_ORDER, rng_for
from shardstore.sampling.shards import (
    PERMUTATION_SCHEDULE,
    SHARD_POLICIES,
    bijection,
    permutation_shards,
    random_shards,
)


def walked_stream(n: int, k: int, seed: int, cycles: int) -> np.ndarray:
    """The specification of schedule 2, built the slow way: every cycle whole, each from the one before.

    A cycle is fresh when the epoch straddling its start carries at most ``n - k`` slots from the
    previous cycle; a fresh cycle is its bijection with the first slots rearranged (stably) so that
    the straddling epoch's first ``k - carried`` shards are not among the carried ones; any other
    cycle repeats the previous one.
    """
    arranged: list[np.ndarray] = []
    for c in range(cycles):
        carried = c * n % k
        if c > 0 and carried > n - k:
            arranged.append(arranged[-1])
            continue
        cycle = bijection(n, seed, c, np.arange(n))
        if carried:
            stale = np.isin(cycle, arranged[-1][n - carried :])
            end = int(np.flatnonzero(~stale)[k - carried - 1]) + 1
            cycle = np.concatenate([cycle[:end][~stale[:end]], cycle[:end][stale[:end]], cycle[end:]])
        arranged.append(cycle)
    return np.concatenate(arranged)


def check_stream(stream: np.ndarray, n: int, k: int) -> None:
    """Every cycle holds every shard once; every epoch window holds no shard twice."""
    for c in range(stream.size // n):
        assert np.array_equal(np.sort(stream[c * n : (c + 1) * n]), np.arange(n)), c
    for e in range(stream.size // k):
        window = stream[e * k : (e + 1) * k]
        assert np.unique(window).size == k, e


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 255, 256, 257, 1000, 4099, 65537])
def test_bijection_is_a_permutation_of_the_range(n: int) -> None:
    for seed, cycle in ((0, 0), (42, 3), (2**40, 10**6)):
        values = bijection(n, seed, cycle, np.arange(n))
        assert values.dtype == np.int64
        assert np.array_equal(np.sort(values), np.arange(n))
    # Evaluated at a few slots, it agrees with the whole permutation.
    whole = bijection(n, 5, 1, np.arange(n))
    some = np.array([n - 1, 0, n // 2])
    assert np.array_equal(bijection(n, 5, 1, some), whole[some])


def test_bijection_depends_on_seed_and_cycle() -> None:
    base = bijection(1000, 1, 0, np.arange(1000))
    assert not np.array_equal(base, bijection(1000, 2, 0, np.arange(1000)))
    assert not np.array_equal(base, bijection(1000, 1, 1, np.arange(1000)))
    assert not np.array_equal(bijection(1000, 0, 1, np.arange(1000)), bijection(1000, 1, 0, np.arange(1000)))


def test_bijection_is_close_to_uniform() -> None:
    """Over 2,000 keys the shard in each slot of a 10-shard cycle is uniform within 6 standard deviations."""
    n, keys = 10, 2000
    table = np.stack([bijection(n, seed, 0, np.arange(n)) for seed in range(keys)])  # [key, slot] -> shard
    expected, sd = keys / n, math.sqrt(keys * (1 / n) * (1 - 1 / n))
    for slot in range(n):
        counts = np.bincount(table[:, slot], minlength=n)
        assert np.all(np.abs(counts - expected) < 6 * sd), (slot, counts)


@settings(max_examples=120, deadline=None)
@given(n=st.integers(2, 60), data=st.data(), seed=st.integers(0, 2**40))
@pytest.mark.slow
def test_permutation_is_the_walked_schedule_and_keeps_its_contract(n: int, data: st.DataObject, seed: int) -> None:
    k = data.draw(st.integers(1, n - 1))
    cycles = 4
    stream = walked_stream(n, k, seed, cycles)
    check_stream(stream, n, k)
    for e in range(stream.size // k):
        got = permutation_shards(n, k, seed, e)
        assert np.array_equal(np.sort(got), np.sort(stream[e * k : (e + 1) * k])), (n, k, e)


@pytest.mark.parametrize(("n", "k"), [(16, 15), (20, 15), (25, 15), (31, 15), (1001, 1000), (10001, 10000), (2, 1)])
def test_epochs_that_nearly_fill_a_cycle(n: int, k: int) -> None:
    """``k < n < 2k``: cycles repeat where a fresh one could not avoid the carried shards; the contract holds."""
    cycles = max(3, min(40, 60_000 // n))
    stream = walked_stream(n, k, 9, cycles)
    check_stream(stream, n, k)
    for e in [*range(min(stream.size // k, 40)), stream.size // k - 1]:
        assert np.array_equal(np.sort(permutation_shards(n, k, 9, e)), np.sort(stream[e * k : (e + 1) * k]))


@pytest.mark.parametrize(("n", "k", "epoch"), [(10**6, 15, 66_666), (10**6, 15, 10**9 + 7), (10001, 10000, 9999),
                                               (10001, 10000, 10**7), (122, 15, 8), (17, 16, 123_456)])
def test_an_epoch_evaluates_a_few_bijections_at_a_few_k_slots(monkeypatch: pytest.MonkeyPatch, n: int, k: int,
                                                                  epoch: int) -> None:
    """The cost of an epoch does not grow with the cache or the epoch: what it evaluates is counted."""
    calls: list[int] = []

    def counted(num_shards: int, seed: int, cycle: int, index: np.ndarray) -> np.ndarray:
        calls.append(len(index))
        return bijection(num_shards, seed, cycle, index)

    monkeypatch.setattr(shards, "bijection", counted)
    got = permutation_shards(n, k, 3, epoch)
    assert np.unique(got).size == k
    assert len(calls) <= 6 and sum(calls) <= 4 * k, calls


@pytest.mark.parametrize("policy", ["permutation", "random"])
def test_an_epoch_of_a_million_shards_allocates_nothing_of_that_size(policy: str) -> None:
    fn = SHARD_POLICIES[policy]
    fn(10**6, 15, 42, 0)  # imports and first-call caches outside the measurement
    tracemalloc.start()
    try:
        for epoch in (1, 66_666, 10**8):  # inside a cycle, straddling the first boundary, far out
            got = fn(10**6, 15, 42, epoch)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got.size == 15 and np.unique(got).size == 15
    assert peak < 1 << 20, f"{policy}: {peak:,} bytes at peak"


def balanced_prefixes(n: int, k: int, seed: int, epochs: int) -> None:
    """Over the first ``e`` epochs, for every ``e``, shard use counts differ by at most one; no epoch repeats a shard.

    This is the cycle contract seen from outside: a shard is used a second time only after every shard
    was used once, and so on. Use counts only grow, so it is enough to check the shards an epoch takes
    against the ceiling ``ceil(slots / n)`` and the least-used shard where the floor ``slots // n`` rises.
    """
    uses = np.zeros(n, np.int64)
    for e in range(epochs):
        got = permutation_shards(n, k, seed, e)
        assert got.size == k and np.unique(got).size == k, e
        assert got.min() >= 0 and got.max() < n
        uses[got] += 1
        slots = (e + 1) * k
        assert uses[got].max() <= -(-slots // n), e
        if slots // n > e * k // n:  # a cycle ended within this epoch: every shard has been used that often
            assert uses.min() >= slots // n, e


@pytest.mark.slow
def test_a_million_shards_in_large_epochs_cover_every_shard_each_cycle() -> None:
    """10^6 shards, epochs of 7,919 (prime: epochs straddle cycles): 2.5 cycles."""
    n, k = 10**6, 7919
    balanced_prefixes(n, k, 42, math.ceil(2.5 * n / k))


@pytest.mark.slow
def test_a_million_shards_in_whole_cycles() -> None:
    n, k = 10**6, 10**4
    balanced_prefixes(n, k, 7, 2 * n // k)
    first_cycle = np.concatenate([permutation_shards(n, k, 7, e) for e in range(n // k)])
    assert np.array_equal(np.sort(first_cycle), np.arange(n))


@pytest.mark.slow
def test_a_hundred_thousand_shards_fifteen_at_a_time_over_two_cycles() -> None:
    n, k = 10**5, 15
    balanced_prefixes(n, k, 1, math.ceil(2 * n / k) + 1)


@pytest.mark.slow
def test_straddling_epoch_at_a_million_shards_takes_the_rest_of_the_cycle() -> None:
    """Epoch 66,666 of 15 takes the last 10 slots of cycle 0 and the first 5 of cycle 1: the 10 are exactly the
    shards epochs 0..66,665 left, and none of the 15 repeats."""
    n, k, seed = 10**6, 15, 5
    straddling = n // k
    before = shards._slots(n, k, seed, 0, np.arange(straddling * k))  # cycle 0 up to the epoch, as slots
    rest = np.setdiff1d(np.arange(n), before)
    got = permutation_shards(n, k, seed, straddling)
    assert rest.size == 10 and np.isin(rest, got).all() and np.unique(got).size == k
    # The epochs that make up cycle 0 up to there are those same slots, epoch by epoch.
    for e in (0, 1, 33_333, straddling - 1):
        assert np.array_equal(np.sort(permutation_shards(n, k, seed, e)), np.sort(before[e * k : (e + 1) * k]))


@pytest.mark.parametrize("policy", ["permutation", "random"])
def test_an_epoch_is_a_pure_function_of_its_arguments(policy: str) -> None:
    fn = SHARD_POLICIES[policy]
    for n, k, e in ((10**6, 15, 5), (122, 15, 9), (16, 15, 40)):
        a = fn(n, k, 42, e)
        fn(n, k, 42, e + 1)  # nothing carries over between calls
        assert np.array_equal(a, fn(n, k, 42, e))
        assert not np.array_equal(a, fn(n, k, 43, e))
        assert not np.array_equal(a, fn(n, k, 42, e + 1))


def test_visit_order_is_shuffled_within_the_epoch() -> None:
    n, k, seed = 10**6, 15, 3
    shuffled = 0
    for e in range(50):
        slots = shards._slots(n, k, seed, 0, np.arange(e * k, (e + 1) * k))
        got = permutation_shards(n, k, seed, e)
        assert np.array_equal(np.sort(got), np.sort(slots))
        assert np.array_equal(got, rng_for(seed, e, VISIT_ORDER).permutation(slots))
        shuffled += not np.array_equal(got, slots)
    assert shuffled >= 49


@pytest.mark.slow
def test_first_epoch_chooses_each_shard_with_probability_k_over_n() -> None:
    """Over 1,500 seeds, epoch 0, the straddling epoch 3 and epoch 7 hold each of 10 shards about 3/10 of the time."""
    n, k, seeds = 10, 3, 1500
    for epoch in (0, 3, 7):
        counts = np.zeros(n, np.int64)
        for seed in range(seeds):
            counts[permutation_shards(n, k, seed, epoch)] += 1
        p = k / n
        assert np.all(np.abs(counts - seeds * p) < 6 * math.sqrt(seeds * p * (1 - p))), (epoch, counts)


def test_the_schedule_is_pinned() -> None:
    """Schedule 2's shards for a few epochs; if this changes on purpose, raise ``PERMUTATION_SCHEDULE``."""
    assert PERMUTATION_SCHEDULE == 2
    got = {e: sorted(permutation_shards(12, 5, 42, e).tolist()) for e in (0, 2, 5)}  # 2 straddles, 5 rearranged
    assert got == {0: [0, 5, 6, 7, 9], 2: [2, 5, 7, 8, 10], 5: [4, 5, 8, 9, 11]}, got
    left_out = {e: sorted(set(range(16)) - set(permutation_shards(16, 15, 42, e).tolist())) for e in (0, 2, 3)}
    assert left_out == {0: [10], 2: [3], 3: [9]}, left_out  # epochs of 15 of 16: cycle 2 repeats cycle 1


@pytest.mark.parametrize("policy", ["permutation", "random"])
def test_whole_cache_when_the_epoch_asks_for_all(policy: str) -> None:
    fn = SHARD_POLICIES[policy]
    for k in (None, 12, 50):
        got = fn(12, k, 1, 3)
        assert np.array_equal(np.sort(got), np.arange(12))


def test_random_policy_is_uniform_and_independent_across_epochs() -> None:
    """Each shard in an epoch with probability k/n (4,000 epochs of 3 of 10), and epochs overlap."""
    n, k, epochs = 10, 3, 4000
    counts = np.zeros(n, np.int64)
    for e in range(epochs):
        got = random_shards(n, k, 11, e)
        assert np.unique(got).size == k
        counts[got] += 1
    p = k / n
    assert np.all(np.abs(counts - epochs * p) < 6 * math.sqrt(epochs * p * (1 - p))), counts
