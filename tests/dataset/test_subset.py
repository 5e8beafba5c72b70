"""RandomShardSubsetCachedDataset: DataLoader workers see set_epoch, exact resume, elastic resume, config errors."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from shardstore import ConfigError, ManifestError, ShardStore, ShardstoreError, ShardWriter, build_manifest
from shardstore.config.data import load_data_config
from shardstore.dataset.cached import CachedTensorDataset
from shardstore.dataset.subset import RandomShardSubsetCachedDataset
from shardstore.sampling.plan import plan_epoch, rank_indices

COUNTS = [16, 16, 9, 16, 16, 5, 16, 16, 12, 16]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ShardStore:
    """Ten uneven shards; field ``gid`` holds each sample's global id, ``label`` its shard (class-sorted)."""
    root = tmp_path_factory.mktemp("subset")
    gid = 0
    for shard_id, n in enumerate(COUNTS):
        with ShardWriter(root, 16, start_shard=shard_id, num_shards=1, fsync=False) as w:
            w.add_batch({"gid": np.arange(gid, gid + n, dtype=np.int64), "label": np.full(n, shard_id % 3, np.int64),
                         "image": np.zeros((n, 3, 2, 2), np.uint8)})
        gid += n
    build_manifest(root)
    return ShardStore.open(root)


def make(store: ShardStore, **kwargs) -> RandomShardSubsetCachedDataset:
    kwargs.setdefault("batch_size", 4)
    return RandomShardSubsetCachedDataset(store, kwargs.pop("k", 4), kwargs.pop("seed", 3), **kwargs)


def test_items_follow_the_plan(store: ShardStore) -> None:
    ds = make(store)
    assert len(ds) == ds.indices().size == ds.steps_per_epoch * 4
    got = [int(ds[i]["gid"]) for i in range(len(ds))]
    assert got == ds.indices().tolist()
    shards = set(ds.selected_shards)
    assert all(int(store.shard_ids[store.locate(np.array([g]))[0][0]]) in shards for g in got)


@pytest.mark.parametrize("order", ["sequential", "interleave"])
@pytest.mark.parametrize(("rank", "world_size"), [(0, 1), (1, 2), (2, 3)])
def test_rank_plan_is_this_ranks_part_without_side_effects(store: ShardStore, order: str, rank: int,
                                                           world_size: int) -> None:
    ds = make(store, sample_order=order, active_shards=3, rank=rank, world_size=world_size, k=6, batch_size=2)
    ds.set_epoch(2)
    current = ds.indices().copy()
    plan = ds.rank_plan(5, 3)
    # Independently of the plan: expand the epoch to global ids, then split them.
    epoch = plan_epoch(np.diff(store.offsets), store.offsets, ds.spec, 5)
    want = rank_indices(epoch, ds.world, 2, None, 3)
    np.testing.assert_array_equal(plan.sample_ids, want)
    np.testing.assert_array_equal(store.offsets[plan.visited[plan.source_index]] + plan.rows, want)
    np.testing.assert_array_equal(ds.epoch_indices(5, 3), want)
    assert plan.store is ds.store and (plan.epoch, plan.start_batch, plan.batch_size) == (5, 3, 2)
    assert plan.num_batches == epoch.num_samples // (world_size * 2) - 3 == want.size // 2
    # Nothing changed: the current epoch, its resume point and its items.
    assert (ds.epoch, ds.start_batch) == (2, 0)
    np.testing.assert_array_equal(ds.indices(), current)
    assert [int(ds[i]["gid"]) for i in range(len(ds))] == current.tolist()
    with pytest.raises(ShardstoreError, match="start batch 999 is past the epoch's"):
        ds.rank_plan(5, 999)


def test_rank_plan_from_another_thread(store: ShardStore) -> None:
    """A loader's planning thread asks for the next epoch while the consumer reads this one."""
    import threading

    ds = make(store)
    got: list = []
    worker = threading.Thread(target=lambda: got.append(ds.rank_plan(1)))
    worker.start()
    worker.join()
    np.testing.assert_array_equal(got[0].sample_ids, ds.epoch_indices(1))
    assert ds.epoch == 0


def test_cached_dataset_returns_owned_tensors(store: ShardStore) -> None:
    base = CachedTensorDataset(store)
    assert len(base) == sum(COUNTS)
    item = base[20]
    assert int(item["gid"]) == 20 and item["image"].shape == (3, 2, 2)
    item["image"] += 1  # in place: must not touch (or crash on) the read-only maps
    assert int(base[20]["image"].sum()) == 0 and int(base[-1]["gid"]) == sum(COUNTS) - 1


@pytest.mark.parametrize("persistent", [False, True])
def test_set_epoch_reaches_dataloader_workers(store: ShardStore, persistent: bool) -> None:
    ds = make(store, k=3)
    loader = DataLoader(ds, batch_size=4, num_workers=2, persistent_workers=persistent)
    seen = []
    for epoch in range(3):
        ds.set_epoch(epoch)
        want = ds.indices().tolist()
        got = torch.cat([b["gid"] for b in loader]).tolist()
        assert got == want, f"epoch {epoch}: workers read another epoch"
        seen.append(got)
    assert seen[0] != seen[1] != seen[2]


def test_resumed_state_yields_exactly_the_remaining_sequence(store: ShardStore) -> None:
    ds = make(store, k=None, sample_order="interleave", active_shards=2)
    ds.set_epoch(5)
    full = ds.indices().tolist()
    state = ds.state_dict(steps_done=7)
    assert set(state) >= {"epoch", "samples_consumed", "random_subset_seed", "sample_order", "snapshot_id"}
    assert state["samples_consumed"] == 28
    fresh = make(store, k=None, sample_order="interleave", active_shards=2)
    fresh.load_state_dict(state)
    assert fresh.epoch == 5 and fresh.indices().tolist() == full[7 * 4 :]
    # Resuming twice composes: 3 more steps, then another resume.
    again = make(store, k=None, sample_order="interleave", active_shards=2)
    again.load_state_dict(fresh.state_dict(steps_done=3))
    assert again.indices().tolist() == full[10 * 4 :]


def test_a_state_saved_with_the_former_field_names_still_resumes(store: ShardStore) -> None:
    ds = make(store, k=None, sample_order="interleave", active_shards=2)
    ds.set_epoch(2)
    state = ds.state_dict(steps_done=3)
    state["seed"], state["order"] = state.pop("random_subset_seed"), state.pop("sample_order")  # an older checkpoint
    fresh = make(store, k=None, sample_order="interleave", active_shards=2)
    fresh.load_state_dict(state)
    assert fresh.epoch == 2 and fresh.indices().tolist() == ds.indices().tolist()[3 * 4 :]
    with pytest.raises(ConfigError, match="sample_order='interleave' but this dataset has 'sequential'"):
        make(store, k=None, active_shards=2).load_state_dict(state)


def test_the_former_argument_spellings_work_with_a_deprecation_warning(store: ShardStore) -> None:
    new = RandomShardSubsetCachedDataset(store, 3, random_subset_seed=5, shard_policy="permutation",
                                         sample_order="interleave", batch_size=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = RandomShardSubsetCachedDataset(store, 3, seed=5, policy="permutation", order="interleave", batch_size=4)
    assert old.spec == new.spec
    assert sorted(str(w.message).split(" is deprecated; use ")[1].split("=")[0] for w in caught
                  if w.category is DeprecationWarning) == ["random_subset_seed", "sample_order", "shard_policy"]
    assert {w.filename for w in caught} == {__file__}  # the warning points at the caller's line
    with pytest.raises(TypeError,
                       match="random_subset_seed=5 and its former spelling seed=6; pass random_subset_seed"):
        RandomShardSubsetCachedDataset(store, 3, random_subset_seed=5, seed=6)
    with pytest.raises(TypeError, match="unexpected keyword argument 'shuffle'"):
        RandomShardSubsetCachedDataset(store, 3, shuffle=True)


def test_four_ranks_resume_on_two_with_the_same_global_sequence(store: ShardStore) -> None:
    def global_seq(datasets: list[RandomShardSubsetCachedDataset]) -> list[int]:
        b = datasets[0].batch_size
        parts = [d.indices() for d in datasets]
        return [int(x) for s in range(parts[0].size // b) for p in parts for x in p[s * b : (s + 1) * b]]

    four = [make(store, k=None, batch_size=2, rank=r, world_size=4) for r in range(4)]
    for d in four:
        d.set_epoch(2)
    whole = global_seq(four)
    state = four[0].state_dict(steps_done=5)
    assert all(d.state_dict(steps_done=5) == state for d in four)
    two = [make(store, k=None, batch_size=4, rank=r, world_size=2) for r in range(2)]
    for d in two:
        d.load_state_dict(state)
    assert global_seq(two) == whole[5 * 8 :]
    with pytest.raises(ConfigError, match="global_batch=8 but this dataset has 4"):
        make(store, k=None, batch_size=2, rank=0, world_size=2).load_state_dict(state)


def test_state_from_other_settings_or_manifest_is_refused(store: ShardStore) -> None:
    state = make(store).state_dict(steps_done=1)
    with pytest.raises(ConfigError, match="random_subset_seed=3 but this dataset has 4"):
        make(store, seed=4).load_state_dict(state)
    with pytest.raises(ConfigError, match="planned on other shards"):
        make(store).load_state_dict({**state, "plan_id": "0" * 16})
    with pytest.raises(ConfigError, match="manifest snapshot"):  # a state saved before plan ids existed
        make(store).load_state_dict({**state, "plan_id": "", "snapshot_id": "0" * 16})
    make(store).load_state_dict({**state, "snapshot_id": "0" * 16})  # a touched file (new snapshot) keeps the plan
    with pytest.raises(ValueError, match="not a sampler state"):
        make(store).load_state_dict({"epoch": 1})


def test_cap_applies_per_rank(store: ShardStore) -> None:
    ds = make(store, k=None, batch_size=4, max_steps_per_epoch=5)
    assert len(ds) == 20
    ds2 = make(store, k=None, batch_size=4, max_steps_per_epoch=5, rank=1, world_size=2)
    assert len(ds2) == 20


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 0}, "shards_per_epoch must be a positive integer or null, got 0"),
        ({"seed": 2.5}, "random_subset_seed must be a non-negative integer, got 2.5"),
        ({"shard_policy": "uniform"}, "unknown shard_policy 'uniform'"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"rank": 2, "world_size": 2}, r"rank must be an integer in \[0, 2\)"),
        ({"rank": 0}, "give both rank and world_size"),
    ],
)
def test_bad_values_are_one_clear_error(store: ShardStore, kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        make(store, **kwargs)


def test_from_data_config(store: ShardStore, tmp_path: Path) -> None:
    cfg = tmp_path / "data_config.yaml"
    cfg.write_text(f"cache_root: {store.root}\nshards_per_epoch: 3\nrandom_subset_seed: 3\nshard_policy: permutation\n")
    ds = RandomShardSubsetCachedDataset.from_data_config(cfg, batch_size=4)
    assert ds.spec.shard_policy == "permutation" and len(ds.selected_shards) == 3
    assert ds.selected_shards == make(store, k=3, shard_policy="permutation").selected_shards


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("cache_root: x\nshard_per_epoch: 3\n",
         "unknown key `shard_per_epoch` in .*; did you mean `shards_per_epoch`?"),
        ("cache_root: x\nrandom_subset_seed: 1.5\n", "`random_subset_seed` must be int, got 1.5"),
        ("cache_root: x\nshards_per_epoch: 0\n", "`shards_per_epoch` must be at least 1, got 0"),
        ("shards_per_epoch: 3\n", "`cache_root` is missing"),
        ("cache_root: [unclosed\n", "not valid YAML"),
        ("cache_root: x\nloader_threads: 0\n", "`loader_threads` must be at least 1, got 0"),
        ("cache_root: x\nread_ahead_shards: -1\n", "`read_ahead_shards` must be non-negative, got -1"),
        ("cache_root: x\ndrop_finished_pages: 1\n", "`drop_finished_pages` must be bool, got 1"),
        ("cache_root: x\nprefetch_batches: true\n", "`prefetch_batches` must be int, got True"),
    ],
)
def test_data_config_errors(tmp_path: Path, text: str, match: str) -> None:
    cfg = tmp_path / "data_config.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_data_config(cfg)


def test_empty_manifest_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="does not exist; run `shardstore build-manifest"):
        RandomShardSubsetCachedDataset.from_data_config(_write_cfg(tmp_path, tmp_path))


def _write_cfg(tmp_path: Path, root: Path) -> Path:
    cfg = tmp_path / "data_config.yaml"
    cfg.write_text(f"cache_root: {root}\n")
    return cfg


@pytest.mark.slow
def test_spawned_persistent_workers_see_set_epoch(store: ShardStore) -> None:
    ds = make(store, k=2)
    loader = DataLoader(ds, batch_size=4, num_workers=2, persistent_workers=True, multiprocessing_context="spawn")
    for epoch in (0, 7):
        ds.set_epoch(epoch)
        assert torch.cat([b["gid"] for b in loader]).tolist() == ds.indices().tolist()


def test_world_comes_from_torch_distributed(store: ShardStore, tmp_path: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ds = make(store)
        assert (ds.world.rank, ds.world.world_size) == (0, 1)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"k": 2, "batch_size": 64}, r"batch_size 64 per step is more than the \d+ samples of epoch 0 \(2 shards of "),
    ({"k": 2, "batch_size": 16, "rank": 1, "world_size": 4},
     r"batch_size 16 x world_size 4 = 64 samples per step is more than the \d+ samples of epoch 0"),
])
def test_an_epoch_with_zero_steps_is_a_config_error(store: ShardStore, kwargs: dict, match: str) -> None:
    ds = make(store, **kwargs)
    for read in (len, lambda d: d.steps_per_epoch, lambda d: d.epoch_indices(1)):
        with pytest.raises(ConfigError, match=match[:30]) as info:
            read(ds)
        assert "0 steps; lower batch_size, or raise shards_per_epoch" in str(info.value)
    with pytest.raises(ConfigError, match=match):
        len(ds)
