"""Shard policies: which shards an epoch visits, and in what order, from ``(seed, epoch)`` alone.

Every policy has the signature ``(num_shards, shards_per_epoch, seed, epoch) -> positions``
(int64 shard positions in visit order, no repeats) and is chosen by name from ``SHARD_POLICIES``.
``shards_per_epoch`` of None, or at least ``num_shards``, means the whole cache.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from shardstore.sampling.seeds import CHOOSE_SHARDS, PERMUTATION, VISIT_ORDER, rng_for

ShardPolicy = Callable[[int, "int | None", int, int], np.ndarray]


def _whole_cache(num_shards: int, seed: int, epoch: int) -> np.ndarray:
    return rng_for(seed, epoch, VISIT_ORDER).permutation(num_shards).astype(np.int64)


def random_shards(num_shards: int, shards_per_epoch: int | None, seed: int, epoch: int) -> np.ndarray:
    """``shards_per_epoch`` shards uniformly without replacement, independently each epoch (epochs overlap)."""
    if shards_per_epoch is None or shards_per_epoch >= num_shards:
        return _whole_cache(num_shards, seed, epoch)
    chosen = rng_for(seed, epoch, CHOOSE_SHARDS).choice(num_shards, shards_per_epoch, replace=False)
    return rng_for(seed, epoch, VISIT_ORDER).permutation(chosen).astype(np.int64)


def _cycle(num_shards: int, seed: int, cycle: int) -> np.ndarray:
    return rng_for(seed, cycle, PERMUTATION).permutation(num_shards)


def permutation_shards(num_shards: int, shards_per_epoch: int | None, seed: int, epoch: int) -> np.ndarray:
    """Walk seeded permutations ``shards_per_epoch`` at a time: every shard once before any repeats.

    Epoch ``e`` takes slots ``[e*k, (e+1)*k)`` of the concatenated permutations (cycles).
    When an epoch straddles two cycles, the next cycle puts first the shards that the
    epoch has not taken yet, so no epoch holds a shard twice; each cycle is still a
    permutation of all shards.
    """
    if shards_per_epoch is None or shards_per_epoch >= num_shards:
        return _whole_cache(num_shards, seed, epoch)
    k = shards_per_epoch
    start, stop = epoch * k, (epoch + 1) * k
    first_cycle = start // num_shards
    # Cycles before ``first_cycle`` matter only through the reordering of their successor,
    # which depends on the previous cycle's tail: walk them from the start (O(epoch * k)).
    prev = _cycle(num_shards, seed, 0)
    for c in range(1, first_cycle + 1):
        prev = _rearranged(prev, _cycle(num_shards, seed, c), c * num_shards % k)
    taken = prev[start - first_cycle * num_shards : min(stop, (first_cycle + 1) * num_shards) - first_cycle * num_shards]
    if stop > (first_cycle + 1) * num_shards:
        following = _rearranged(prev, _cycle(num_shards, seed, first_cycle + 1), len(taken))
        taken = np.concatenate([taken, following[: k - len(taken)]])
    return rng_for(seed, epoch, VISIT_ORDER).permutation(taken).astype(np.int64)


def _rearranged(prev: np.ndarray, cycle: np.ndarray, tail: int) -> np.ndarray:
    """``cycle`` with the shards of ``prev``'s last ``tail`` slots moved out of its head (stable)."""
    if tail == 0:
        return cycle
    used = np.zeros(cycle.size, dtype=bool)
    used[prev[-tail:]] = True
    fresh = cycle[~used[cycle]]
    stale = cycle[used[cycle]]
    return np.concatenate([fresh, stale])


SHARD_POLICIES: dict[str, ShardPolicy] = {
    "random": random_shards,
    "permutation": permutation_shards,
}
