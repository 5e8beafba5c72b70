"""Coverage curves: the expectation and its spread checked exactly on small caches, the policies against them over
seeds within a bound from that spread, and permutation's whole cache after ceil(N/k) epochs."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from shardstore.sampling.coverage import coverage, expected_coverage
from shardstore.sampling.plan import EpochSpec

UNEQUAL = np.array([1, 2, 3, 4, 5], np.int64)


def exact_moments(counts: np.ndarray, outcomes: list[set[int]]) -> tuple[float, float]:
    """Mean and standard deviation of the share of samples in the seen shards, over equally likely outcomes."""
    shares = np.array([counts[sorted(seen)].sum() / counts.sum() for seen in outcomes])
    return float(shares.mean()), float(shares.std())


@pytest.mark.parametrize(("k", "epochs"), [(1, 3), (2, 1), (2, 2), (2, 3), (3, 2), (4, 1), (5, 2)])
def test_random_expectation_and_spread_are_exact(k: int, epochs: int) -> None:
    """Every sequence of independent uniform k-subsets of 5 unequal shards, enumerated."""
    subsets = [set(s) for s in itertools.combinations(range(5), k)]
    outcomes = [set().union(*draw) for draw in itertools.product(subsets, repeat=epochs)]
    mean, std = expected_coverage(UNEQUAL, k, "random", epochs)
    want_mean, want_std = exact_moments(UNEQUAL, outcomes)
    assert mean[-1] == pytest.approx(want_mean, abs=1e-12)
    assert std[-1] == pytest.approx(want_std, abs=1e-12)


@pytest.mark.parametrize(("k", "epochs"), [(1, 1), (1, 3), (2, 1), (2, 2), (2, 3), (3, 1), (4, 2)])
def test_permutation_expectation_and_spread_are_exact_for_a_uniform_first_cycle(k: int, epochs: int) -> None:
    """Every order of the first cycle of 5 unequal shards, enumerated: the first E*k are seen."""
    outcomes = [set(order[: epochs * k]) for order in itertools.permutations(range(5))]
    mean, std = expected_coverage(UNEQUAL, k, "permutation", epochs)
    want_mean, want_std = exact_moments(UNEQUAL, outcomes)
    assert mean[-1] == pytest.approx(want_mean, abs=1e-12)
    assert std[-1] == pytest.approx(want_std, abs=1e-12)


def test_expectations_are_the_closed_forms() -> None:
    counts = np.random.default_rng(0).integers(1, 3000, 122)
    e = np.arange(1, 21)
    mean, _ = expected_coverage(counts, 15, "random", 20)
    assert np.allclose(mean, 1 - (1 - 15 / 122) ** e, rtol=0, atol=1e-12)  # whatever the shard sizes
    mean, _ = expected_coverage(counts, 15, "permutation", 20)
    assert np.allclose(mean, np.minimum(1, e * 15 / 122), rtol=0, atol=1e-12)
    for policy in ("random", "permutation"):
        for k in (None, 122, 500):
            mean, std = expected_coverage(counts, k, policy, 3)
            assert np.array_equal(mean, [1, 1, 1]) and np.array_equal(std, [0, 0, 0])


SEEDS = 200
Z = 5.0  # |mean over seeds - expectation| <= Z standard errors; two-sided normal tail 6e-7 per epoch compared


@pytest.mark.parametrize("policy", ["random", "permutation"])
@pytest.mark.parametrize("sizes", ["equal", "unequal"])
@pytest.mark.slow
def test_policy_over_seeds_agrees_with_the_expectation(policy: str, sizes: str) -> None:
    """The mean over 200 seeds lies within 5 standard errors (sd / sqrt(200), sd from ``expected_coverage``)."""
    n, k, epochs = 60, 7, 25
    counts = np.full(n, 100) if sizes == "equal" else np.random.default_rng(1).integers(1, 400, n)
    runs = np.stack([coverage(counts, EpochSpec(shards_per_epoch=k, random_subset_seed=seed, shard_policy=policy),
                              epochs).seen_fraction for seed in range(SEEDS)])
    mean, std = expected_coverage(counts, k, policy, epochs)
    error = np.abs(runs.mean(axis=0) - mean)
    bound = Z * std / math.sqrt(SEEDS)
    assert np.all(error <= bound + 1e-12), np.flatnonzero(error > bound + 1e-12)


@pytest.mark.parametrize(("n", "k"), [(60, 7), (122, 15), (10, 10), (16, 15), (1000, 1)])
def test_permutation_sees_every_sample_after_ceil_n_over_k_epochs(n: int, k: int) -> None:
    counts = np.random.default_rng(n).integers(1, 50, n)
    full = math.ceil(n / k)
    curve = coverage(counts, EpochSpec(shards_per_epoch=k, random_subset_seed=3, shard_policy="permutation"), full + 2)
    assert np.array_equal(curve.seen_shards, np.minimum(n, k * np.arange(1, full + 3)))
    assert curve.seen_fraction[full - 1] == 1.0 and np.all(curve.seen_fraction[full:] == 1.0)
    if full > 1:
        assert curve.seen_fraction[full - 2] < 1.0
    assert curve.new_samples.sum() == counts.sum()


def test_the_curve_is_what_the_policy_chose() -> None:
    counts = np.array([5, 0, 7, 3, 9, 2, 4, 4], np.int64)  # an empty shard counts no samples
    spec = EpochSpec(shards_per_epoch=3, random_subset_seed=11, shard_policy="random")
    curve = coverage(counts, spec, 6)
    seen: set[int] = set()
    for e, positions in enumerate(curve.positions):
        assert np.array_equal(positions, coverage(counts, spec, e + 1).positions[e])
        new = set(positions.tolist()) - seen
        seen |= new
        assert curve.new_samples[e] == counts[sorted(new)].sum()
        assert curve.seen_shards[e] == len(seen)
        assert curve.seen_fraction[e] == pytest.approx(counts[sorted(seen)].sum() / counts.sum())
    assert curve.policy == "random" and curve.expected.shape == curve.expected_std.shape == (6,)


@pytest.mark.parametrize(
    ("counts", "epochs", "match"),
    [
        ([], 3, "non-empty 1-D integer array"),
        ([[1, 2]], 3, "non-empty 1-D integer array"),
        ([1.5, 2.0], 3, "non-empty 1-D integer array"),
        ([0, 0], 3, "at least one sample"),
        ([3, -1], 3, "non-negative"),
        ([3, 4], 0, "epochs must be a positive integer, got 0"),
        ([3, 4], True, "epochs must be a positive integer, got True"),
    ],
)
def test_bad_input_is_one_clear_error(counts: list, epochs: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        coverage(np.asarray(counts), EpochSpec(shards_per_epoch=1, random_subset_seed=0), epochs)  # type: ignore[arg-type]


def test_unknown_policy_in_the_expectation() -> None:
    with pytest.raises(ValueError, match="unknown shard_policy 'perm'"):
        expected_coverage(np.ones(4, np.int64), 2, "perm", 3)
