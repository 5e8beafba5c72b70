"""Order policies: how the samples of an epoch's visited shards are interleaved, each shard read front to back.

Every policy has the signature ``(counts, seed, epoch, active_shards) -> source`` where
``counts`` are the visited shards' sample counts in visit order and ``source`` (or None
for plain concatenation) names, for each position of the epoch, the visited shard that
supplies its next row. The compiled ``expand_epoch`` kernel turns it into sample ids.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from shardstore.sampling.seeds import MIX, rng_for

OrderPolicy = Callable[[np.ndarray, int, int, int], "np.ndarray | None"]


def sequential(counts: np.ndarray, seed: int, epoch: int, active_shards: int) -> None:
    """File order: one shard after the other, each front to back (the default)."""
    return None


def interleave(counts: np.ndarray, seed: int, epoch: int, active_shards: int) -> np.ndarray:
    """Mix ``active_shards`` shards at a time: a uniformly random merge of their rows, each read front to back.

    The visited shards are taken in groups of ``active_shards``; within a group every
    position draws which shard supplies its next row (all merges equally likely). Reads
    stay local — at most ``active_shards`` files are open and each is read sequentially —
    while a batch holds samples of several shards, which matters for caches written in
    class order.
    """
    rng = rng_for(seed, epoch, MIX)
    parts = []
    for lo in range(0, counts.size, active_shards):
        group = np.arange(lo, min(lo + active_shards, counts.size), dtype=np.int64)
        labels = np.repeat(group, counts[group])
        rng.shuffle(labels)
        parts.append(labels)
    return np.concatenate(parts) if parts else np.empty(0, np.int64)


ORDER_POLICIES: dict[str, OrderPolicy] = {
    "sequential": sequential,
    "interleave": interleave,
}
