"""An epoch's plan: its shards and global read order (independent of the world size), and each rank's part."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import numpy as np

from shardstore import kernels
from shardstore.sampling.order import ORDER_POLICIES
from shardstore.sampling.seeds import check_seed
from shardstore.sampling.shards import SHARD_POLICIES
from shardstore.sampling.world import World


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


@dataclass(frozen=True)
class EpochSpec:
    """How epochs are drawn; everything that, with the manifest, fixes an epoch's global read order."""

    shards_per_epoch: int | None = 15
    """Shards per epoch; None (or at least the shard count) means the whole cache."""
    seed: int = 42
    """``random_subset_seed``: with the epoch, the only source of randomness."""
    shard_policy: str = "random"
    """``random`` (independent draws, epochs overlap) or ``permutation`` (all shards before any repeats)."""
    order: str = "sequential"
    """Within-shard order: ``sequential`` (file order) or ``interleave`` (mix ``active_shards`` shards)."""
    active_shards: int = 4
    """Shards read at once by ``interleave``."""

    def __post_init__(self) -> None:
        _positive_or_none("shards_per_epoch", self.shards_per_epoch)
        check_seed(self.seed)
        _choice("shard_policy", self.shard_policy, SHARD_POLICIES)
        _choice("sample_order", self.order, ORDER_POLICIES)
        if _positive_or_none("active_shards", self.active_shards) is None:
            raise ValueError("active_shards must be a positive integer, got None")


@dataclass(frozen=True)
class EpochPlan:
    """One epoch: the visited shard positions in order and the global sample ids in read order."""

    epoch: int
    shard_positions: np.ndarray
    order: np.ndarray


def plan_epoch(counts: np.ndarray, offsets: np.ndarray, spec: EpochSpec, epoch: int) -> EpochPlan:
    """Plan ``epoch`` for a cache whose shard ``p`` has ``counts[p]`` samples starting at global id ``offsets[p]``."""
    if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
        raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}")
    num_shards = int(counts.size)
    if num_shards == 0:
        raise ValueError("the cache has no shards; write some and rebuild the manifest")
    positions = SHARD_POLICIES[spec.shard_policy](num_shards, spec.shards_per_epoch, spec.seed, int(epoch))
    visit_counts = np.ascontiguousarray(counts[positions], dtype=np.int64)
    source = ORDER_POLICIES[spec.order](visit_counts, spec.seed, int(epoch), spec.active_shards)
    order = kernels.expand_epoch(np.ascontiguousarray(offsets[positions], dtype=np.int64), visit_counts, source)
    return EpochPlan(int(epoch), positions, order)


def steps_per_epoch(num_samples: int, world_size: int, batch_size: int, max_steps: int | None) -> int:
    """Batches every rank takes: whole global batches only (the remainder is dropped), capped by ``max_steps``."""
    steps = num_samples // (world_size * batch_size)
    return steps if max_steps is None else min(steps, max_steps)


def rank_indices(plan: EpochPlan, world: World, batch_size: int, max_steps: int | None,
                 start_batch: int = 0) -> np.ndarray:
    """This rank's sample ids for the rest of the epoch from global batch ``start_batch``."""
    steps = steps_per_epoch(plan.order.size, world.world_size, batch_size, max_steps)
    if start_batch > steps:
        raise ValueError(f"start batch {start_batch} is past the epoch's {steps} batches")
    return kernels.split_rank(plan.order, world.rank, world.world_size, batch_size, start_batch, steps - start_batch)
