"""How much of a cache a run's epochs see: per epoch, the shards taken and the distinct samples seen so far,
next to what a shard policy leads one to expect.

Pure NumPy over the shards' sample counts; nothing is read. A sample counts as seen once its
shard has been visited (the batch remainder an epoch drops and ``max_steps_per_epoch`` are not
applied: with them an epoch reads a prefix of its shards' samples).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shardstore.sampling.plan import EpochSpec
from shardstore.sampling.shards import SHARD_POLICIES


@dataclass(frozen=True)
class Coverage:
    """One policy over ``epochs`` epochs; array entry ``e`` is after epoch ``e`` (0-based): after ``e + 1`` epochs."""

    policy: str
    positions: tuple[np.ndarray, ...]
    """Each epoch's shard positions, in visit order."""
    new_samples: np.ndarray
    """int64: samples seen for the first time in each epoch."""
    seen_shards: np.ndarray
    """int64: distinct shards visited so far."""
    seen_fraction: np.ndarray
    """float64: distinct samples seen so far / all samples."""
    expected: np.ndarray
    """float64: the expected ``seen_fraction`` over seeds (see ``expected_coverage``)."""
    expected_std: np.ndarray
    """float64: its standard deviation over seeds."""


def coverage(counts: np.ndarray, spec: EpochSpec, epochs: int) -> Coverage:
    """Run ``spec``'s shard policy for epochs ``0 .. epochs-1`` over shards of ``counts[p]`` samples.

    ``spec.shards_per_epoch`` (None: the whole cache), ``spec.random_subset_seed`` and ``spec.shard_policy``
    are used; the within-shard order does not change what is seen.
    """
    counts = _check_counts(counts)
    epochs = _check_epochs(epochs)
    policy = SHARD_POLICIES[spec.shard_policy]
    seen = np.zeros(counts.size, dtype=bool)
    positions, new_samples, seen_shards = [], np.zeros(epochs, np.int64), np.zeros(epochs, np.int64)
    distinct = 0
    for e in range(epochs):
        taken = policy(counts.size, spec.shards_per_epoch, spec.random_subset_seed, e)
        fresh = taken[~seen[taken]]
        seen[fresh] = True
        distinct += fresh.size
        positions.append(taken)
        new_samples[e] = counts[fresh].sum()
        seen_shards[e] = distinct
    mean, std = expected_coverage(counts, spec.shards_per_epoch, spec.shard_policy, epochs)
    seen_fraction = np.cumsum(new_samples) / counts.sum()
    return Coverage(spec.shard_policy, tuple(positions), new_samples, seen_shards, seen_fraction, mean, std)


def expected_coverage(counts: np.ndarray, shards_per_epoch: int | None, policy: str,
                      epochs: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation over seeds of the fraction of samples seen after 1 .. ``epochs`` epochs.

    ``random``: a shard is missed by an epoch with probability ``1 - k/N``, independently of other
    epochs, so after ``E`` epochs it has been seen with probability ``1 - (1 - k/N)^E``. That
    holds for every shard alike, so the expected fraction of *samples* seen is the same whatever
    the shard sizes (``sum_p n_p (1 - (1 - k/N)^E) / sum_p n_p``); the sizes only widen the spread.

    ``permutation``: after ``E`` epochs exactly ``min(N, E k)`` shards have been seen (every shard
    once per cycle), a uniformly random subset while the first cycle lasts, so the expected
    fraction of samples is ``min(1, E k / N)``, reaching 1 after ``ceil(N / k)`` epochs.

    The spread is that of the seen samples ``sum_p n_p [p seen]`` from the probability that one
    shard, and that two given shards, are both still unseen.
    """
    counts = _check_counts(counts)
    epochs = _check_epochs(epochs)
    if policy not in SHARD_POLICIES:
        raise ValueError(f"unknown shard_policy {policy!r} (choose from {', '.join(sorted(SHARD_POLICIES))})")
    n = counts.size
    k = n if shards_per_epoch is None else min(int(shards_per_epoch), n)
    e = np.arange(1, epochs + 1, dtype=np.float64)
    pairs = n * (n - 1)
    if policy == "random":
        unseen = (1.0 - k / n) ** e
        both_unseen = ((n - k) * (n - k - 1) / pairs) ** e if pairs else np.zeros_like(e)
    else:
        left = np.maximum(n - e * k, 0.0)  # shards not yet seen
        unseen = left / n
        both_unseen = left * (left - 1) / pairs if pairs else np.zeros_like(e)
    total = counts.sum(dtype=np.float64)
    squares = np.square(counts, dtype=np.float64).sum()
    # Var(sum_p n_p [p unseen]) = (P(both) - P(one)^2) (sum n)^2 + (P(one) - P(both)) sum n^2, in this form
    # because the first term is a small difference of large numbers.
    variance = (both_unseen - unseen**2) * total**2 + (unseen - both_unseen) * squares
    return 1.0 - unseen, np.sqrt(np.maximum(variance, 0.0)) / total


def _check_counts(counts: np.ndarray) -> np.ndarray:
    counts = np.asarray(counts)
    if counts.ndim != 1 or counts.size == 0 or not np.issubdtype(counts.dtype, np.integer):
        raise ValueError("counts must be a non-empty 1-D integer array of samples per shard")
    if counts.min() < 0 or counts.sum() == 0:
        raise ValueError("counts must be non-negative with at least one sample in all")
    return counts.astype(np.int64, copy=False)


def _check_epochs(epochs: object) -> int:
    if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    return int(epochs)
