"""Epoch plans: determinism, every policy's invariants, rank splits, the cap, and elastic resume."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shardstore.sampling.order import ORDER_POLICIES
from shardstore.sampling.plan import (
    EpochPlan,
    EpochSpec,
    RankPlan,
    plan_epoch,
    rank_indices,
    rank_plan,
    steps_per_epoch,
    whole_store_plan,
)
from shardstore.sampling.shards import SHARD_POLICIES
from shardstore.sampling.world import World


def cache(counts: list[int]) -> tuple[np.ndarray, np.ndarray]:
    c = np.asarray(counts, dtype=np.int64)
    return c, np.concatenate([[0], np.cumsum(c)]).astype(np.int64)


def check_plan(plan: EpochPlan, counts: np.ndarray, offsets: np.ndarray, spec: EpochSpec) -> None:
    """The invariants every policy must keep."""
    positions = plan.shard_positions
    assert len(set(positions.tolist())) == positions.size  # no shard twice in an epoch
    k = spec.shards_per_epoch
    assert positions.size == (counts.size if k is None or k >= counts.size else k)
    # The epoch reads exactly the samples of its shards, each shard front to back.
    want = np.concatenate([np.arange(offsets[p], offsets[p] + counts[p]) for p in positions])
    assert np.array_equal(np.sort(plan.order), np.sort(want))
    for p in positions:
        rows = plan.order[(plan.order >= offsets[p]) & (plan.order < offsets[p + 1])]
        assert np.all(np.diff(rows) == 1)
    if spec.sample_order == "sequential":
        assert np.array_equal(plan.order, want)


POLICIES = [(s, o) for s in SHARD_POLICIES for o in ORDER_POLICIES]


@pytest.mark.parametrize(("shard_policy", "order"), POLICIES)
@given(
    counts=st.lists(st.integers(0, 30), min_size=1, max_size=25),
    k=st.one_of(st.none(), st.integers(1, 30)),
    seed=st.integers(0, 2**40),
    epoch=st.integers(0, 60),
    active=st.integers(1, 5),
)
def test_every_policy_keeps_the_invariants(shard_policy, order, counts, k, seed, epoch, active) -> None:
    c, offs = cache(counts)
    spec = EpochSpec(shards_per_epoch=k, random_subset_seed=seed, shard_policy=shard_policy, sample_order=order,
                     active_shards=active)
    check_plan(plan_epoch(c, offs, spec, epoch), c, offs, spec)


@pytest.mark.parametrize(("shard_policy", "order"), POLICIES)
def test_same_seed_and_epoch_same_plan_different_epochs_differ(shard_policy: str, order: str) -> None:
    c, offs = cache([50] * 40)
    spec = EpochSpec(shards_per_epoch=5, random_subset_seed=7, shard_policy=shard_policy, sample_order=order)
    a, b = plan_epoch(c, offs, spec, 3), plan_epoch(c, offs, spec, 3)
    assert np.array_equal(a.order, b.order) and np.array_equal(a.shard_positions, b.shard_positions)
    assert not np.array_equal(plan_epoch(c, offs, spec, 4).order, a.order)
    other_seed = plan_epoch(c, offs, EpochSpec(shards_per_epoch=5, random_subset_seed=8, shard_policy=shard_policy,
                                               sample_order=order), 3)
    assert not np.array_equal(other_seed.order, a.order)


def test_seed_and_epoch_do_not_collide() -> None:
    c, offs = cache([10] * 30)
    a = plan_epoch(c, offs, EpochSpec(shards_per_epoch=5, random_subset_seed=1), 0).shard_positions
    b = plan_epoch(c, offs, EpochSpec(shards_per_epoch=5, random_subset_seed=0), 1).shard_positions
    assert not np.array_equal(a, b)


@pytest.mark.slow
def test_plan_is_the_same_in_a_fresh_process_with_another_hash_seed() -> None:
    code = (
        "import hashlib, numpy as np\n"
        "from shardstore.sampling.plan import EpochSpec, plan_epoch\n"
        "c = np.array([37, 2048, 5, 900] * 8, dtype=np.int64); o = np.concatenate([[0], np.cumsum(c)])\n"
        "for s, p in [('random', 'sequential'), ('permutation', 'interleave')]:\n"
        "    spec = EpochSpec(shards_per_epoch=7, random_subset_seed=42, shard_policy=s, sample_order=p,\n"
        "                     active_shards=3)\n"
        "    plan = plan_epoch(c, o, spec, 11)\n"
        "    print(hashlib.sha256(plan.order.tobytes()).hexdigest())\n"
    )
    outs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={**os.environ, "PYTHONHASHSEED": h}).stdout
        for h in ("0", "12345", "random")
    }
    assert len(outs) == 1 and len(next(iter(outs)).split()) == 2


@pytest.mark.parametrize(("num_shards", "k"), [(10, 3), (122, 15), (7, 7), (9, 1), (13, 5)])
def test_permutation_covers_every_shard_before_any_repeats(num_shards: int, k: int) -> None:
    c, offs = cache([4] * num_shards)
    spec = EpochSpec(shards_per_epoch=k, random_subset_seed=3, shard_policy="permutation")
    epochs = math.ceil(num_shards / k)
    seen: list[int] = []
    for e in range(epochs * 4):
        seen.extend(plan_epoch(c, offs, spec, e).shard_positions.tolist())
    assert set(seen[: epochs * k]) == set(range(num_shards))  # covered within ceil(N/k) epochs
    for e in range(1, epochs * 4 + 1):  # no shard is used a second time before all were used once, and so on
        uses = np.bincount(seen[: e * k], minlength=num_shards)
        assert uses.max() - uses.min() <= 1, (e, uses)


def test_random_policy_overlaps_across_epochs() -> None:
    c, offs = cache([4] * 20)
    sets = [set(plan_epoch(c, offs, EpochSpec(shards_per_epoch=10, random_subset_seed=0),
                           e).shard_positions.tolist()) for e in range(6)]
    assert any(sets[i] & sets[i + 1] for i in range(5))


UNEVEN = [2048, 2048, 1000, 2048, 17, 2048, 0, 1500, 2048, 333, 2048, 2048]


@pytest.mark.parametrize("world_size", range(1, 9))
@pytest.mark.parametrize("order", ["sequential", "interleave"])
def test_ranks_are_disjoint_equal_and_cover_all_but_the_remainder(world_size: int, order: str) -> None:
    c, offs = cache(UNEVEN)
    spec = EpochSpec(shards_per_epoch=7, random_subset_seed=5, shard_policy="random", sample_order=order)
    plan = plan_epoch(c, offs, spec, 2)
    batch = 32
    parts = [rank_indices(plan, World(r, world_size), batch, None) for r in range(world_size)]
    steps = plan.order.size // (world_size * batch)
    assert all(p.size == steps * batch for p in parts)  # the same number of batches everywhere
    union = np.concatenate(parts)
    assert np.unique(union).size == union.size  # disjoint
    assert set(union.tolist()) == set(plan.order[: steps * world_size * batch].tolist())
    assert plan.order.size - union.size < world_size * batch  # only the remainder is dropped
    # Rank r's b-th batch is the r-th contiguous run of global batch b.
    g = world_size * batch
    for r, part in enumerate(parts):
        for b in (0, steps - 1):
            assert np.array_equal(part[b * batch : (b + 1) * batch],
                                  plan.order[b * g + r * batch : b * g + (r + 1) * batch])


def test_max_steps_per_epoch_caps_batches() -> None:
    assert steps_per_epoch(15 * 2048, 1, 64, None) == 480
    assert steps_per_epoch(15 * 2048, 1, 64, 250) == 250
    assert steps_per_epoch(15 * 2048, 4, 64, 250) == 120  # 30720 // 256: fewer than the cap
    c, offs = cache([2048] * 122)
    plan = plan_epoch(c, offs, EpochSpec(shards_per_epoch=15, random_subset_seed=42), 0)
    assert rank_indices(plan, World(), 64, None).size == 480 * 64
    assert rank_indices(plan, World(), 64, 250).size == 250 * 64
    assert rank_indices(plan, World(1, 2), 64, 100).size == 100 * 64


def test_global_sequence_does_not_depend_on_world_size() -> None:
    c, offs = cache(UNEVEN)
    plan = plan_epoch(c, offs, EpochSpec(shards_per_epoch=None, random_subset_seed=9,
                                         shard_policy="random", sample_order="interleave"), 1)

    def global_sequence(world_size: int, batch: int, start: int = 0) -> list[int]:
        parts = [rank_indices(plan, World(r, world_size), batch, None, start) for r in range(world_size)]
        steps = parts[0].size // batch
        return [int(x) for b in range(steps) for p in parts for x in p[b * batch : (b + 1) * batch]]

    assert global_sequence(4, 16) == global_sequence(2, 32) == global_sequence(1, 64)
    assert global_sequence(4, 16, start=5) == global_sequence(2, 32, start=5) == global_sequence(1, 64)[5 * 64 :]


class FakeStore:
    """What a plan reads of a store: its offsets and counts (a plan only keeps a reference to the store)."""

    def __init__(self, offsets: np.ndarray) -> None:
        self.offsets = offsets
        self.counts = np.diff(offsets)


def check_rank_plan(part: RankPlan, offsets: np.ndarray) -> None:
    """What the loader relies on: shards in first-read order, rows inside them, spans that match, read-only."""
    counts = np.diff(offsets)
    assert np.array_equal(np.unique(part.source_index, return_index=True)[1], part.first_sample)
    assert np.all(np.diff(part.first_sample) > 0)  # visited in the order first read
    assert np.unique(part.visited).size == part.visited.size
    assert np.all(part.rows >= 0) and np.all(part.rows < counts[part.visited][part.source_index])
    for t in range(part.visited.size):
        assert np.flatnonzero(part.source_index == t)[-1] == part.last_sample[t]
    for arr in (part.visited, part.source_index, part.rows, part.first_sample, part.last_sample, part.sample_ids):
        assert not arr.flags.writeable
        with pytest.raises(ValueError):
            arr.flags.writeable = True


@pytest.mark.parametrize(("shard_policy", "order"), POLICIES)
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_rank_plan_reads_the_rank_indices(shard_policy: str, order: str, world_size: int) -> None:
    """Without expanding global ids, a rank's plan names the same samples, in the same order, as ``rank_indices``."""
    c, offs = cache(UNEVEN)
    store = FakeStore(offs)
    for epoch in range(3):
        plan = plan_epoch(c, offs, EpochSpec(shards_per_epoch=6, random_subset_seed=11, shard_policy=shard_policy,
                                             sample_order=order, active_shards=3), epoch)
        rank_plan(plan, store, World(world_size - 1, world_size), 16, None, 1)
        assert "order" not in plan.__dict__  # planning a rank's part did not expand the epoch's global ids
        for rank in range(world_size):
            world = World(rank, world_size)
            for batch, cap, start in [(16, None, 0), (16, None, 5), (7, 30, 0), (7, 30, 29), (32, 3, 3)]:
                part = rank_plan(plan, store, world, batch, cap, start)
                want = rank_indices(plan, world, batch, cap, start)
                np.testing.assert_array_equal(part.sample_ids, want)
                np.testing.assert_array_equal(offs[part.visited][part.source_index] + part.rows, want)
                assert (part.epoch, part.start_batch, part.batch_size, part.store) == (epoch, start, batch, store)
                assert part.num_batches * batch == part.num_samples == want.size
                check_rank_plan(part, offs)


def test_rank_plan_past_the_epoch_is_an_error() -> None:
    c, offs = cache(UNEVEN)
    plan = plan_epoch(c, offs, EpochSpec(shards_per_epoch=3, random_subset_seed=1), 0)
    steps = steps_per_epoch(plan.num_samples, 1, 16, None)
    assert rank_plan(plan, FakeStore(offs), World(), 16, None, steps).num_samples == 0
    with pytest.raises(ValueError, match=f"start batch {steps + 1} is past the epoch's {steps} batches"):
        rank_plan(plan, FakeStore(offs), World(), 16, None, steps + 1)


@pytest.mark.parametrize("drop_last", [True, False])
def test_whole_store_plan_reads_every_sample_in_id_order(drop_last: bool) -> None:
    c, offs = cache(UNEVEN)
    store = FakeStore(offs)
    total = int(offs[-1])
    part = whole_store_plan(store, 10, drop_last)
    n = total - total % 10 if drop_last else total
    np.testing.assert_array_equal(part.sample_ids, np.arange(n))
    assert part.num_batches == (total // 10 if drop_last else -(-total // 10))
    used = [p for p in range(c.size) if c[p] and offs[p] < n]  # empty shards, and those past the cut, are not visited
    assert part.visited.tolist() == used
    check_rank_plan(part, offs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"shards_per_epoch": 0}, "shards_per_epoch must be a positive integer or null, got 0"),
        ({"shards_per_epoch": -3}, "shards_per_epoch must be a positive integer or null"),
        ({"random_subset_seed": 1.5}, "random_subset_seed must be a non-negative integer, got 1.5"),
        ({"random_subset_seed": "42"}, "random_subset_seed must be a non-negative integer"),
        ({"shard_policy": "permutaton"}, "unknown shard_policy 'permutaton'; did you mean 'permutation'?"),
        ({"sample_order": "shuffle"}, "unknown sample_order 'shuffle'"),
        ({"active_shards": 0}, "active_shards must be a positive integer"),
    ],
)
def test_bad_values_are_one_clear_error(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        EpochSpec(**kwargs)


def test_empty_cache_is_a_clear_error() -> None:
    c, offs = cache([])
    with pytest.raises(ValueError, match="the cache has no shards"):
        plan_epoch(c, offs, EpochSpec(), 0)


def test_the_interleave_mix_depends_on_the_epoch() -> None:
    """Each epoch mixes its shards anew (the same epoch the same way), not only picks other shards."""
    counts = np.full(8, 30, np.int64)
    mix = ORDER_POLICIES["interleave"]
    a, b = mix(counts, 7, 3, 4), mix(counts, 7, 3, 4)
    assert np.array_equal(a, b)
    assert not np.array_equal(mix(counts, 7, 4, 4), a)
    # Through the plan: which visited shard feeds each position (not which shards are visited) differs.
    c, offs = cache([30] * 8)
    spec = EpochSpec(shards_per_epoch=None, random_subset_seed=7,
                     shard_policy="random", sample_order="interleave", active_shards=4)

    def pattern(epoch: int) -> np.ndarray:
        plan = plan_epoch(c, offs, spec, epoch)
        visit_index = np.empty(c.size, np.int64)
        visit_index[plan.shard_positions] = np.arange(plan.shard_positions.size)
        return visit_index[np.searchsorted(offs, plan.order, side="right") - 1]

    assert np.array_equal(pattern(5), pattern(5))
    assert not np.array_equal(pattern(5), pattern(6))


def test_epoch_spec_is_keyword_only_with_the_yaml_keys_names() -> None:
    with pytest.raises(TypeError):
        EpochSpec(5, 42)  # type: ignore[misc]
    spec = EpochSpec(shards_per_epoch=5, random_subset_seed=7, shard_policy="permutation", sample_order="interleave")
    assert (spec.random_subset_seed, spec.shard_policy, spec.sample_order) == (7, "permutation", "interleave")


def test_the_yaml_keys_the_spec_the_dataset_and_the_saved_state_share_one_name_per_setting() -> None:
    import inspect
    from dataclasses import fields

    from shardstore.config.data import DataConfig
    from shardstore.dataset.subset import RandomShardSubsetCachedDataset
    from shardstore.sampling.state import SamplerState

    settings = DataConfig(cache_root="cache").epoch_settings()
    assert set(settings) == {f.name for f in fields(EpochSpec)} == set(DataConfig.__dataclass_fields__) & set(settings)
    assert EpochSpec(**settings) == EpochSpec()  # and the same defaults
    assert set(settings) <= set(inspect.signature(RandomShardSubsetCachedDataset).parameters)
    assert set(settings) <= {f.name for f in fields(SamplerState)}
