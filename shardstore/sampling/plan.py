"""An epoch's plan: its shards and read order (independent of the world size), and each rank's part as it is read."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np

from shardstore import kernels
from shardstore.sampling.order import ORDER_POLICIES
from shardstore.sampling.seeds import check_seed
from shardstore.sampling.shards import SHARD_POLICIES
from shardstore.sampling.world import World

if TYPE_CHECKING:
    from shardstore.store.reader import ShardStore


def _choice(kind: str, value: object, options: dict) -> str:
    if value in options:
        return str(value)
    close = difflib.get_close_matches(str(value), options, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown {kind} {value!r}{hint} (choose from {', '.join(sorted(options))})")


def _positive_or_none(name: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer or null, got {value!r}")
    return int(value)


@dataclass(frozen=True, kw_only=True)
class EpochSpec:
    """How epochs are drawn; everything that, with the manifest, fixes an epoch's global read order.

    Each field has the name of its ``data_config.yaml`` key.
    """

    shards_per_epoch: int | None = 15
    """Shards per epoch; None (or at least the shard count) means the whole cache."""
    random_subset_seed: int = 42
    """With the epoch, the only source of randomness."""
    shard_policy: str = "random"
    """``random`` (independent draws, epochs overlap) or ``permutation`` (all shards before any repeats)."""
    sample_order: str = "sequential"
    """Within-shard order: ``sequential`` (file order) or ``interleave`` (mix ``active_shards`` shards)."""
    active_shards: int = 4
    """Shards read at once by ``interleave``."""

    def __post_init__(self) -> None:
        _positive_or_none("shards_per_epoch", self.shards_per_epoch)
        check_seed(self.random_subset_seed)
        _choice("shard_policy", self.shard_policy, SHARD_POLICIES)
        _choice("sample_order", self.sample_order, ORDER_POLICIES)
        if _positive_or_none("active_shards", self.active_shards) is None:
            raise ValueError("active_shards must be a positive integer, got None")


@dataclass(frozen=True)
class EpochPlan:
    """One epoch: the visited shard positions in order, and how their samples are interleaved.

    Sample ids (``order``) are expanded only when asked for: the loader reads ``RankPlan``s.
    """

    epoch: int
    shard_positions: np.ndarray
    """Visited shard positions, in visit order."""
    counts: np.ndarray
    """Sample count of each visited shard."""
    starts: np.ndarray
    """Global id of each visited shard's first sample."""
    source: np.ndarray | None
    """For each read position, the index (into ``shard_positions``) of the shard that supplies its next row;
    None: one shard after the other."""

    @property
    def num_samples(self) -> int:
        return int(self.counts.sum())

    @cached_property
    def order(self) -> np.ndarray:
        """Global sample ids in read order (independent of the world size)."""
        return kernels.expand_epoch(self.starts, self.counts, self.source)


def plan_epoch(counts: np.ndarray, offsets: np.ndarray, spec: EpochSpec, epoch: int) -> EpochPlan:
    """Plan ``epoch`` for a cache whose shard ``p`` has ``counts[p]`` samples starting at global id ``offsets[p]``."""
    if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
        raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}")
    num_shards = int(counts.size)
    if num_shards == 0:
        raise ValueError("the cache has no shards; write some and rebuild the manifest")
    seed = spec.random_subset_seed
    positions = SHARD_POLICIES[spec.shard_policy](num_shards, spec.shards_per_epoch, seed, int(epoch))
    visit_counts = np.ascontiguousarray(counts[positions], dtype=np.int64)
    source = ORDER_POLICIES[spec.sample_order](visit_counts, seed, int(epoch), spec.active_shards)
    starts = np.ascontiguousarray(offsets[positions], dtype=np.int64)
    return EpochPlan(int(epoch), positions, visit_counts, starts, source)


def steps_per_epoch(num_samples: int, world_size: int, batch_size: int, max_steps: int | None) -> int:
    """Batches every rank takes: whole global batches only (the remainder is dropped), capped by ``max_steps``."""
    steps = num_samples // (world_size * batch_size)
    return steps if max_steps is None else min(steps, max_steps)


def _rank_batches(plan: EpochPlan, world: World, batch_size: int, max_steps: int | None, start_batch: int) -> int:
    steps = steps_per_epoch(plan.num_samples, world.world_size, batch_size, max_steps)
    if start_batch > steps:
        raise ValueError(f"start batch {start_batch} is past the epoch's {steps} batches")
    return steps - start_batch


def rank_indices(plan: EpochPlan, world: World, batch_size: int, max_steps: int | None,
                 start_batch: int = 0) -> np.ndarray:
    """This rank's sample ids for the rest of the epoch from global batch ``start_batch``."""
    num_batches = _rank_batches(plan, world, batch_size, max_steps, start_batch)
    return kernels.split_rank(plan.order, world.rank, world.world_size, batch_size, start_batch, num_batches)


def _frozen(arr: np.ndarray) -> np.ndarray:
    """A read-only view that cannot be made writeable again (its base is read-only too)."""
    arr.flags.writeable = False
    return arr.view()


@dataclass(frozen=True, eq=False)
class RankPlan:
    """What one rank reads of an epoch (from ``start_batch`` on), as the batch gather reads it: no global ids.

    Sample ``k`` (batch ``k // batch_size``) is row ``rows[k]`` of the shard at position
    ``visited[source_index[k]]`` of ``store``; ``visited`` lists the shards in the order this
    rank first reads them, so ``first_sample`` (per visited shard, the first sample that reads
    it) increases, and ``last_sample`` is the last one. Positions index ``store``'s shards:
    read through ``store``, the store this plan was made for. The arrays are read-only.
    """

    epoch: int
    start_batch: int
    """Global batch this part starts at (0, or where a resumed run continues)."""
    num_batches: int
    """Batches of this rank; the last may be short only in a whole-store plan."""
    batch_size: int
    store: ShardStore
    visited: np.ndarray
    source_index: np.ndarray
    rows: np.ndarray
    first_sample: np.ndarray
    last_sample: np.ndarray

    @property
    def num_samples(self) -> int:
        return int(self.rows.size)

    @cached_property
    def sample_ids(self) -> np.ndarray:
        """Global sample ids (read-only), for map-style access and tests; the loader does not need them."""
        return _frozen(self.store.offsets[self.visited][self.source_index] + self.rows)


def _rank_plan(epoch: int, start_batch: int, num_batches: int, batch_size: int, store: ShardStore,
               positions: np.ndarray, parts: tuple[np.ndarray, ...]) -> RankPlan:
    touched, source_index, rows, first_sample, last_sample = parts
    visited = np.ascontiguousarray(positions[touched], dtype=np.int64)
    return RankPlan(int(epoch), int(start_batch), int(num_batches), int(batch_size), store, _frozen(visited),
                    _frozen(source_index), _frozen(rows), _frozen(first_sample), _frozen(last_sample))


def rank_plan(plan: EpochPlan, store: ShardStore, world: World, batch_size: int, max_steps: int | None,
              start_batch: int = 0) -> RankPlan:
    """This rank's part of ``plan`` (made from ``store``'s shards) from global batch ``start_batch``.

    Global batch ``b`` is read positions ``[b*G, (b+1)*G)`` of the epoch with ``G = world_size
    * batch_size``; the rank reads its contiguous run ``[rank*batch_size, (rank+1)*batch_size)``
    of each (the same samples as ``rank_indices``).
    """
    num_batches = _rank_batches(plan, world, batch_size, max_steps, start_batch)
    parts = kernels.rank_rows(plan.counts, plan.source, world.rank, world.world_size, batch_size, start_batch,
                              num_batches * batch_size)
    return _rank_plan(plan.epoch, start_batch, num_batches, batch_size, store, plan.shard_positions, parts)


def whole_store_plan(store: ShardStore, batch_size: int, drop_last: bool) -> RankPlan:
    """Every sample of ``store`` in id order, one rank: shards front to back (short last batch unless ``drop_last``)."""
    counts = np.asarray(store.counts)
    full, rest = divmod(int(store.offsets[-1]), batch_size)
    num_samples = full * batch_size if drop_last else full * batch_size + rest
    parts = kernels.rank_rows(counts, None, 0, 1, batch_size, 0, num_samples)
    return _rank_plan(0, 0, -(-num_samples // batch_size), batch_size, store, np.arange(counts.size), parts)
