"""The loader reads each rank's plan as it is: the same batches as indexing the store at the epoch's ids,
through the store the plan was made on, without locating ids or asking the dataset for them."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from shardstore import ShardStore
from shardstore.dataset.cached import CachedTensorDataset
from shardstore.dataset.subset import RandomShardSubsetCachedDataset
from shardstore.loader import ShardLoader
from shardstore.loader.jobs import Job
from shardstore.sampling.plan import plan_epoch, rank_indices, whole_store_plan

from .conftest import write_gid_cache

FIELDS = ("gid", "image", "emb")


def want_ids(store: ShardStore, ds: RandomShardSubsetCachedDataset, epoch: int, start_batch: int = 0) -> np.ndarray:
    """This rank's ids of ``epoch``, the long way round: every global id of the epoch, then the rank's runs of them."""
    plan = plan_epoch(np.diff(store.offsets), store.offsets, ds.spec, epoch)
    return rank_indices(plan, ds.world, ds.batch_size, ds.max_steps_per_epoch, start_batch)


def fields_at(store: ShardStore, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Each field of ``store`` at the global ``ids``, one sample at a time (plain indexing)."""
    if ids.size == 0:
        return {}
    positions, rows = store.locate(ids)
    return {name: np.stack([store.field(int(p), name)[int(r)] for p, r in zip(positions, rows)])
            for name in FIELDS}


def check_batches(loader: ShardLoader, store: ShardStore, ids: np.ndarray, batch_size: int) -> None:
    want = fields_at(store, ids)
    sizes = []
    for b, batch in enumerate(loader):
        assert set(batch) == set(FIELDS)
        lo = b * batch_size
        for name in FIELDS:
            got = batch[name].numpy()
            np.testing.assert_array_equal(got, want[name][lo : lo + got.shape[0]], err_msg=f"batch {b} {name}")
        sizes.append(batch["gid"].shape[0])
    assert sum(sizes) == ids.size and len(sizes) == -(-ids.size // batch_size)


@pytest.mark.parametrize("cap", [None, 4])
@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("order", ["sequential", "interleave"])
@pytest.mark.parametrize("policy", ["random", "permutation"])
def test_every_policy_order_and_rank_reads_the_plain_batches(store: ShardStore, policy: str, order: str,
                                                             world_size: int, cap: int | None) -> None:
    for rank in range(world_size):
        ds = RandomShardSubsetCachedDataset(store, 7, 5, policy, sample_order=order, active_shards=3, batch_size=4,
                                            max_steps_per_epoch=cap, rank=rank, world_size=world_size)
        with ShardLoader(ds, num_threads=2, prefetch=2) as loader:
            for epoch in (0, 1):  # epoch 1 was prepared while epoch 0 drained
                loader.set_epoch(epoch)
                ids = want_ids(store, ds, epoch)
                assert ids.size == 4 * (cap or ids.size // 4)
                check_batches(loader, store, ids, 4)
            ds.set_epoch(3, start_batch=2)  # a resume mid-epoch
            check_batches(loader, store, want_ids(store, ds, 3, 2), 4)
        assert loader.warm_starts == 1


@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("batch_size", [1, 7, 32, 1000])
def test_a_whole_store_reads_the_plain_batches(store: ShardStore, batch_size: int, drop_last: bool) -> None:
    total = store.num_samples
    n = total - total % batch_size if drop_last else total
    for source in (store, CachedTensorDataset(store)):
        with ShardLoader(source, batch_size, drop_last=drop_last) as loader:
            for _ in range(2):  # the second pass was prepared while the first drained
                check_batches(loader, store, np.arange(n), batch_size)
            assert len(loader) == -(-n // batch_size)


def test_the_loader_neither_locates_ids_nor_asks_the_dataset_for_them(store: ShardStore,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    ds = RandomShardSubsetCachedDataset(store, 5, 7, sample_order="interleave", batch_size=8)
    want = [want_ids(store, ds, e) for e in range(3)]
    ids = {e: fields_at(store, w)["gid"] for e, w in enumerate(want)}

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the loader must read the plan as it is")

    monkeypatch.setattr(ShardStore, "locate", refuse)
    monkeypatch.setattr(ds, "epoch_indices", refuse)
    with ShardLoader(ds) as loader:
        for epoch in range(3):
            loader.set_epoch(epoch)
            got = np.concatenate([b["gid"].numpy().copy() for b in loader])
            np.testing.assert_array_equal(got, ids[epoch])
    with ShardLoader(store, 10, drop_last=False) as loader:
        got = np.concatenate([b["gid"].numpy().copy() for b in loader])
        np.testing.assert_array_equal(got, np.arange(store.num_samples))


def wait_planned(loader: ShardLoader, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not all(job.planned for job in loader._pipeline._jobs):
        assert time.monotonic() < deadline, "the next epoch was never planned"
        time.sleep(0.01)


@pytest.mark.parametrize("drop_pages", [False, True])
def test_each_epoch_is_read_through_the_store_it_was_planned_on(tmp_path: Path, drop_pages: bool) -> None:
    """A dataset whose store grows (a newer manifest with more shards) between epochs: each epoch is read
    through its plan's store, an epoch prepared before the change included."""
    root = write_gid_cache(tmp_path / "cache")
    grown = ShardStore.open(root)
    old = grown.subset(range(8))  # the first 8 shards: the cache before 4 more were written
    ds = RandomShardSubsetCachedDataset(old, None, 3, sample_order="interleave", batch_size=4)
    with ShardLoader(ds, read_ahead_shards=2, drop_pages=drop_pages) as loader:
        check_batches(loader, old, want_ids(old, ds, 0), 4)
        wait_planned(loader)  # epoch 1 is prepared on the old store
        ds.store, ds.base = grown, CachedTensorDataset(grown)
        loader.set_epoch(1)
        # ... and read through it; epoch 2 is planned on the new one
        check_batches(loader, old, want_ids(old, ds, 1), 4)
        loader.set_epoch(2)
        ids = want_ids(grown, ds, 2)
        assert ids.max() >= old.num_samples  # the new shards are read
        check_batches(loader, grown, ids, 4)
        assert loader.warm_starts == 2
        np.testing.assert_array_equal(ds.indices(), ids)


def test_rank_plans_are_split_like_the_global_sequence(store: ShardStore) -> None:
    """Ranks' loaders together read each global batch, in order, whatever the world size."""
    def global_sequence(world_size: int, batch_size: int) -> list[int]:
        parts = []
        for rank in range(world_size):
            ds = RandomShardSubsetCachedDataset(store, None, 9, sample_order="interleave", batch_size=batch_size,
                                                rank=rank, world_size=world_size)
            with ShardLoader(ds) as loader:
                parts.append([b["gid"].numpy().copy() for b in loader])
        return [int(x) for step in zip(*parts) for b in step for x in b]

    assert global_sequence(1, 12) == global_sequence(2, 6) == global_sequence(3, 4)


@pytest.mark.parametrize("order", ["sequential", "interleave"])
@pytest.mark.parametrize(("rank", "world_size", "start_batch"), [(0, 1, 0), (1, 2, 3), (2, 3, 1)])
def test_a_job_knows_when_each_shard_is_first_and_last_read(store: ShardStore, order: str, rank: int,
                                                            world_size: int, start_batch: int) -> None:
    """What unmapping, dropping pages and reading ahead rely on, against a count over the samples."""
    ds = RandomShardSubsetCachedDataset(store, None, 4, sample_order=order, active_shards=4, batch_size=5, rank=rank,
                                        world_size=world_size)
    plans = [ds.rank_plan(2, start_batch)]
    for batch_size, drop_last in ((5, True), (7, False), (7, True)):
        plans.append(whole_store_plan(store, batch_size, drop_last))
    for plan in plans:
        job = Job("key")
        job.plan(plan)
        batch_of = np.arange(job.num_samples) // plan.batch_size
        assert job.num_batches == -(-job.num_samples // plan.batch_size) and job.store is store
        for j in range(job.visited.size):
            mine = batch_of[job.source_index == j]
            assert (job.first_batch[j], job.last_batch[j]) == (mine.min(), mine.max())
        for b in range(job.num_batches):
            assert job.shards_needed_by(b) == np.unique(job.source_index[batch_of <= b]).size
        assert job.take_finished(1).tolist() == np.flatnonzero(job.last_batch < 1).tolist()
