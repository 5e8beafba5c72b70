"""Shard policies: which shards an epoch visits, and in what order, from ``(seed, epoch)`` alone.

Every policy has the signature ``(num_shards, shards_per_epoch, seed, epoch) -> positions``
(int64 shard positions in visit order, no repeats) and is chosen by name from ``SHARD_POLICIES``.
``shards_per_epoch`` of None, or at least ``num_shards``, means the whole cache.

Both policies cost O(shards_per_epoch) per epoch, not O(num_shards): a cache of a million
shards plans an epoch of 15 in well under a millisecond and allocates nothing the size of
the cache (only the whole-cache case permutes every shard, as it must).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

from shardstore.sampling.seeds import CHOOSE_SHARDS, PERMUTATION, VISIT_ORDER, rng_for, words_for

ShardPolicy = Callable[[int, "int | None", int, int], np.ndarray]

PERMUTATION_SCHEDULE = 2
"""Version of ``permutation``'s schedule: which shards epoch ``e`` takes for a given seed.

1: each cycle a ``Generator.permutation`` of every shard (O(num_shards) per epoch).
2: each cycle a keyed bijection of ``[0, num_shards)`` evaluated only at the epoch's slots.
A sampler state saved under another version names other shards for the same epoch.
"""

_ROUNDS = 6  # Feistel rounds, alternating halves: each half is rewritten 3 times
_M1 = np.uint64(0xBF58476D1CE4E5B9)  # splitmix64's finalizer constants
_M2 = np.uint64(0x94D049BB133111EB)


def _whole_cache(num_shards: int, seed: int, epoch: int) -> np.ndarray:
    return rng_for(seed, epoch, VISIT_ORDER).permutation(num_shards).astype(np.int64)


def random_shards(num_shards: int, shards_per_epoch: int | None, seed: int, epoch: int) -> np.ndarray:
    """``shards_per_epoch`` shards uniformly without replacement, independently each epoch (epochs overlap).

    ``Generator.choice`` draws a few of many without touching the rest (Floyd's method, a set
    of the chosen): O(shards_per_epoch) in time and memory. NumPy shuffles a whole index array
    only when an epoch takes more than a fiftieth of a cache of over 10,000 shards, where that
    array is at most 50 epochs long.
    """
    if shards_per_epoch is None or shards_per_epoch >= num_shards:
        return _whole_cache(num_shards, seed, epoch)
    chosen = rng_for(seed, epoch, CHOOSE_SHARDS).choice(num_shards, shards_per_epoch, replace=False)
    return rng_for(seed, epoch, VISIT_ORDER).permutation(chosen).astype(np.int64)


def permutation_shards(num_shards: int, shards_per_epoch: int | None, seed: int, epoch: int) -> np.ndarray:
    """Walk seeded permutations ``shards_per_epoch`` at a time: every shard once before any repeats.

    Schedule ``PERMUTATION_SCHEDULE`` (2). Epoch ``e`` takes slots ``[e*k, (e+1)*k)`` of the
    concatenated cycles of ``num_shards`` slots; cycle ``c`` puts shard ``pi_c(i)`` in slot
    ``i``, where ``pi_c`` is a bijection of ``[0, num_shards)`` keyed by ``(seed, c)`` (a
    Feistel network, cycle-walked into range) evaluated only at the slots the epoch takes.
    When an epoch straddles two cycles, the next cycle's first slots are rearranged (stably)
    so that the shards the epoch took from the previous cycle come after the ones it still
    needs: no epoch holds a shard twice, and each cycle is still a permutation of all shards.
    Visit order is then shuffled per epoch.

    When an epoch nearly fills a cycle (``k < num_shards < 2k``) a rearranged head could
    reach the slots the next straddling epoch takes from the cycle's end, and each cycle
    would depend on the one before. There, a cycle whose straddling epoch takes more than
    ``num_shards - k`` slots from the previous cycle repeats that cycle's arrangement
    instead (the epoch then takes ``k`` consecutive slots of one permutation, read around its
    end: distinct shards). With ``num_shards >= 2k`` every cycle is a fresh permutation.
    Either way an epoch costs O(k): at most two bijections evaluated at about ``2k`` slots.
    """
    if shards_per_epoch is None or shards_per_epoch >= num_shards:
        return _whole_cache(num_shards, seed, epoch)
    n, k = num_shards, shards_per_epoch
    cycle, first = divmod(epoch * k, n)
    if first + k <= n:
        taken = _slots(n, k, seed, cycle, np.arange(first, first + k, dtype=np.int64))
    else:  # straddles cycles `cycle` and `cycle + 1`
        tail = _slots(n, k, seed, cycle, np.arange(first, n, dtype=np.int64))
        taken = np.concatenate([tail, _slots(n, k, seed, cycle + 1, np.arange(k - tail.size, dtype=np.int64))])
    return rng_for(seed, epoch, VISIT_ORDER).permutation(taken).astype(np.int64)


def _carried(num_shards: int, k: int, cycle: int) -> int:
    """Slots of the epoch straddling the start of ``cycle`` that lie in ``cycle - 1`` (0: no epoch straddles)."""
    return cycle * num_shards % k


def _source(num_shards: int, k: int, cycle: int) -> int:
    """The cycle whose bijection (and rearranged head) ``cycle`` uses: itself, or the last fresh one before it.

    A cycle is fresh when its straddling epoch carries at most ``num_shards - k`` slots from the
    previous cycle. Going back one cycle lowers the carried count by ``d = num_shards - k``
    (while it stays above ``d``), so the last fresh cycle is a closed form, not a walk.
    """
    d = num_shards - k
    carried = _carried(num_shards, k, cycle)
    return cycle if carried <= d else cycle - -(-(carried - d) // d)


def _slots(num_shards: int, k: int, seed: int, cycle: int, index: np.ndarray) -> np.ndarray:
    """The shards in slots ``index`` of ``cycle``: the bijection, with the cycle's rearranged head laid over it."""
    source = _source(num_shards, k, cycle)
    values = bijection(num_shards, seed, source, index)
    if _carried(num_shards, k, source) and index.size and int(index.min()) < k:
        head = _head(num_shards, k, seed, source)
        inside = index < head.size
        values[inside] = head[index[inside]]
    return values


def _head(num_shards: int, k: int, seed: int, cycle: int) -> np.ndarray:
    """The first slots of fresh ``cycle`` as rearranged: its first ``k - carried`` shards avoid the carried ones.

    Slots past the returned head (at most ``k`` slots) hold the bijection unchanged. The
    carried shards are the previous cycle's last ``carried <= num_shards - k`` slots, at or
    past slot ``k`` of their own permutation: never in a rearranged head, so they are plain
    bijection values and no cycle depends on an earlier one's rearrangement.
    """
    n = num_shards
    carried = _carried(n, k, cycle)
    previous = bijection(n, seed, _source(n, k, cycle - 1), np.arange(n - carried, n, dtype=np.int64))
    raw = bijection(n, seed, cycle, np.arange(k, dtype=np.int64))
    stale = np.isin(raw, previous)
    # The shortest prefix holding k - carried fresh shards (at most k slots: only `carried` are stale).
    end = int(np.flatnonzero(~stale)[k - carried - 1]) + 1
    return np.concatenate([raw[:end][~stale[:end]], raw[:end][stale[:end]]])


def bijection(num_shards: int, seed: int, cycle: int, index: np.ndarray) -> np.ndarray:
    """``pi(index)`` for the bijection of ``[0, num_shards)`` keyed by ``(seed, cycle)``: O(len(index)).

    A Feistel network on the smallest power-of-two domain holding ``num_shards`` (less than twice
    its size): the value's high and low halves take turns being XORed with a keyed hash of the
    other (multiply-xorshift, as in splitmix64), which is invertible whatever the hash. Values
    that land outside ``[0, num_shards)`` are encrypted again (cycle-walking), which keeps it a
    bijection of the smaller range; fewer than 2 walks per value on average.
    """
    bits = max(1, (num_shards - 1).bit_length())
    low_bits = (bits + 1) // 2
    high_bits = bits - low_bits
    keys = _round_keys(seed, cycle)
    values = np.asarray(index, dtype=np.int64).astype(np.uint64)
    todo = np.arange(values.size)
    shift, low_mask, limit = np.uint64(low_bits), np.uint64((1 << low_bits) - 1), np.uint64(num_shards)
    while todo.size > _FEW:  # one encryption of every value still out of range, as whole arrays
        x = values[todo]
        high, low = x >> shift, x & low_mask
        for r, key in enumerate(keys):
            if r % 2 == 0:
                low ^= _mix(high, np.uint64(key), low_bits)
            elif high_bits:
                high ^= _mix(low, np.uint64(key), high_bits)
        x = (high << shift) | low
        values[todo] = x
        todo = todo[x >= limit]
    if todo.size:  # the last few (or a small call): plain integers, without NumPy's cost per call
        values[todo] = [_walk(int(v), num_shards, keys, low_bits, high_bits) for v in values[todo]]
    return values.astype(np.int64)


_FEW = 32  # below this many values, Python integers beat NumPy's overhead of about a microsecond per operation
_MASK64 = (1 << 64) - 1


@functools.lru_cache(maxsize=16)
def _round_keys(seed: int, cycle: int) -> tuple[int, ...]:
    """The Feistel round keys of ``(seed, cycle)`` (cached: an epoch asks for the same cycle up to four times)."""
    return tuple(int(w) for w in words_for(seed, cycle, PERMUTATION, count=_ROUNDS))


def _mix(values: np.ndarray, key: np.uint64, bits: int) -> np.ndarray:
    """A keyed hash of ``values`` to ``bits`` bits (the high bits of a multiply-xorshift: the best mixed)."""
    z = (values + key) * _M1
    z ^= z >> np.uint64(31)
    z *= _M2
    return z >> np.uint64(64 - bits)


def _walk(x: int, num_shards: int, keys: tuple[int, ...], low_bits: int, high_bits: int) -> int:
    """Encrypt ``x`` until it lands in ``[0, num_shards)``: ``_mix`` and the rounds of ``bijection`` on one integer."""
    low_mask, m1, m2 = (1 << low_bits) - 1, int(_M1), int(_M2)
    while True:
        high, low = x >> low_bits, x & low_mask
        for r, key in enumerate(keys):
            if r % 2 == 0:
                z = ((high + key) & _MASK64) * m1 & _MASK64
                z = (z ^ (z >> 31)) * m2 & _MASK64
                low ^= z >> (64 - low_bits)
            elif high_bits:
                z = ((low + key) & _MASK64) * m1 & _MASK64
                z = (z ^ (z >> 31)) * m2 & _MASK64
                high ^= z >> (64 - high_bits)
        x = (high << low_bits) | low
        if x < num_shards:
            return x


SHARD_POLICIES: dict[str, ShardPolicy] = {
    "random": random_shards,
    "permutation": permutation_shards,
}
