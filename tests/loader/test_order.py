"""ShardLoader yields exactly the dataset's batches, in its order, from reused buffers, across epochs and resumes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from shardstore import ConfigError, ShardStore
from shardstore.dataset.cached import CachedTensorDataset
from shardstore.dataset.subset import RandomShardSubsetCachedDataset
from shardstore.loader import ShardLoader


def make(store: ShardStore, batch_size: int = 8, **kwargs) -> RandomShardSubsetCachedDataset:
    return RandomShardSubsetCachedDataset(store, kwargs.pop("k", 5), kwargs.pop("seed", 7), batch_size=batch_size,
                                          **kwargs)


def expected_batches(ds, batch_size: int) -> list[dict[str, np.ndarray]]:
    """The same epoch by plain indexing, one sample at a time."""
    items = [ds[i] for i in range(len(ds))]
    return [{k: np.stack([it[k].numpy() for it in items[s : s + batch_size]]) for k in items[0]}
            for s in range(0, len(items), batch_size)]


def check_epoch(loader: ShardLoader, ds, batch_size: int) -> int:
    want = expected_batches(ds, batch_size)
    got = 0
    for b, batch in enumerate(loader):
        assert set(batch) == {"gid", "image", "emb"}
        for name, tensor in batch.items():
            np.testing.assert_array_equal(tensor.numpy(), want[b][name], err_msg=f"batch {b} field {name}")
        got += 1
    assert got == len(want) == len(loader)
    return got


@pytest.mark.parametrize("num_threads", [1, 2, 3])
@pytest.mark.parametrize("batch_size", [1, 5, 8, 64])
def test_batches_equal_plain_indexing(store: ShardStore, num_threads: int, batch_size: int) -> None:
    ds = make(store, batch_size)
    with ShardLoader(ds, num_threads=num_threads, prefetch=2) as loader:
        for epoch in range(3):
            loader.set_epoch(epoch)
            check_epoch(loader, ds, batch_size)


@pytest.mark.parametrize("order", ["sequential", "interleave"])
@pytest.mark.parametrize("rank", [0, 1, 2])
def test_each_rank_reads_its_part(store: ShardStore, order: str, rank: int) -> None:
    ds = make(store, 4, sample_order=order, active_shards=3, rank=rank, world_size=3, k=None)
    with ShardLoader(ds) as loader:
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            check_epoch(loader, ds, 4)


def test_next_epoch_is_prepared_while_this_one_drains(store: ShardStore) -> None:
    ds = make(store)
    with ShardLoader(ds) as loader:
        for epoch in range(4):
            loader.set_epoch(epoch)
            check_epoch(loader, ds, 8)
        assert loader.warm_starts == 3  # epochs 1, 2, 3 found their first batches in preparation
        # A jump the loader could not foresee is still read correctly (from a fresh start).
        loader.set_epoch(9)
        check_epoch(loader, ds, 8)
        assert loader.warm_starts == 3
        loader.set_epoch(10)
        check_epoch(loader, ds, 8)
        assert loader.warm_starts == 4


def test_no_buffer_is_allocated_per_batch(store: ShardStore) -> None:
    ds = make(store, 4, k=None)
    with ShardLoader(ds, num_threads=2, prefetch=2) as loader:
        ring = len(loader._pipeline.slots)
        pointers = set()
        batches = 0
        for epoch in range(3):
            loader.set_epoch(epoch)
            for batch in loader:
                pointers.add(batch["image"].data_ptr())
                batches += 1
        assert batches > 3 * ring  # many more batches than buffers...
        assert len(pointers) == ring  # ...all served from the same ring of buffers


def test_whole_cache_in_id_order(store: ShardStore) -> None:
    total = store.num_samples
    for drop_last in (True, False):
        with ShardLoader(CachedTensorDataset(store), 24, drop_last=drop_last) as loader:
            for _ in range(2):  # a second pass, prepared while the first drained
                ids = np.concatenate([b["gid"].numpy().copy() for b in loader])
                n = total - total % 24 if drop_last else total
                np.testing.assert_array_equal(ids, np.arange(n))
        assert len(ShardLoader(store, 24, drop_last=drop_last)) == (total // 24 if drop_last else -(-total // 24))


def test_resume_mid_epoch_yields_the_rest(store: ShardStore) -> None:
    ds = make(store, 8)
    with ShardLoader(ds) as loader:
        loader.set_epoch(2)
        full = [b["gid"].clone() for b in loader]
        loader.set_epoch(2)
        it = iter(loader)
        for _ in range(3):
            next(it)
        state = loader.state_dict()
        assert state["samples_consumed"] == 3 * 8 and state["epoch"] == 2
        del it
    fresh = make(store, 8)
    with ShardLoader(fresh) as loader:
        loader.load_state_dict(state)
        rest = [b["gid"].clone() for b in loader]
    assert len(rest) == len(full) - 3
    for a, b in zip(rest, full[3:]):
        assert torch.equal(a, b)


def test_max_steps_per_epoch_caps_the_loader(store: ShardStore) -> None:
    ds = make(store, 8, max_steps_per_epoch=3)
    with ShardLoader(ds) as loader:
        assert loader.max_steps_per_epoch == 3 and loader.steps_per_epoch == 3 and len(loader) == 3
        assert sum(1 for _ in loader) == 3


def test_wait_times_are_recorded_per_batch(store: ShardStore) -> None:
    ds = make(store, 8)
    with ShardLoader(ds) as loader:
        n = sum(1 for _ in loader)
        assert loader.stats.per_batch_s.shape == (n,)
        assert (loader.stats.per_batch_s >= 0).all()
        assert loader.stats.epoch_s == pytest.approx(loader.stats.per_batch_s.sum())
        assert loader.stats.batches == n
        loader.set_epoch(1)
        m = sum(1 for _ in loader)
        assert loader.stats.batches == n + m and loader.stats.per_batch_s.shape == (m,)
        assert loader.stats.total_s >= loader.stats.epoch_s
        assert set(loader.stats.as_dict()) == {"wait_s_total", "wait_s_epoch", "wait_s_last", "wait_s_remote",
                                               "wait_s_local", "batches"}
        assert loader.stats.remote_s == 0.0 and loader.stats.local_s == loader.stats.total_s  # a local cache


def test_plain_dataloader_gives_the_same_batches(store: ShardStore) -> None:
    """The drop-in path: the dataset through torch's DataLoader, sequential sampler, workers."""
    ds = make(store, 8)
    ds.set_epoch(3)
    with ShardLoader(ds) as loader:
        ours = [{k: v.clone() for k, v in b.items()} for b in loader]
    theirs = list(DataLoader(ds, batch_size=8, num_workers=2))
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 16}, "batch_size 16 differs from the dataset's 8"),
        ({"num_threads": 0}, "num_threads must be an integer >= 1, got 0"),
        ({"prefetch": -1}, "prefetch must be an integer >= 1"),
        ({"device": "cuda"}, "sees no CUDA device"),
        ({"device": "meta"}, "device 'meta' is not supported"),
        ({"device": "potato"}, "is not a torch device"),
        ({"pin_memory": True}, "pin_memory=True needs CUDA"),
    ],
)
def test_bad_arguments_are_config_errors(store: ShardStore, kwargs: dict, match: str) -> None:
    if torch.cuda.is_available() and ("device" in kwargs and kwargs["device"] == "cuda" or "pin_memory" in kwargs):
        pytest.skip("CUDA is available here")
    with pytest.raises(ConfigError, match=match):
        ShardLoader(make(store, 8), **kwargs)


def test_other_datasets_are_refused(store: ShardStore) -> None:
    with pytest.raises(ConfigError, match="got list; use torch.utils.data.DataLoader for others"):
        ShardLoader([1, 2, 3], 4)
    with pytest.raises(ConfigError, match="batch_size is required"):
        ShardLoader(store)
    with ShardLoader(store, 4) as loader, pytest.raises(ConfigError, match="set_epoch needs a RandomShardSubset"):
        loader.set_epoch(1)


def test_loader_settings_from_the_data_config(store: ShardStore, tmp_path) -> None:
    from shardstore.config.data import load_data_config

    cfg = tmp_path / "data_config.yaml"
    cfg.write_text(f"cache_root: {store.root}\nloader_threads: 1\nprefetch_batches: 2\nread_ahead_shards: 0\n"
                   "drop_finished_pages: true\n")
    config = load_data_config(cfg)
    assert config.loader_kwargs() == {"num_threads": 1, "prefetch": 2, "read_ahead_shards": 0, "drop_pages": True}
    ds = RandomShardSubsetCachedDataset.from_data_config(config, batch_size=8)
    with ShardLoader(ds, **config.loader_kwargs()) as loader:
        assert loader._pipeline.num_threads == 1 and loader._pipeline.drop_pages
        check_epoch(loader, ds, 8)


@pytest.mark.parametrize("drop_last", [True, False])
def test_drop_last_decides_the_short_final_batch(store: ShardStore, drop_last: bool) -> None:
    """Exact batch sizes, as many batches as ``len()`` says, no empty batch at the end."""
    total = store.num_samples
    assert total % 6  # a short final batch exists
    with ShardLoader(store, 6, drop_last=drop_last) as loader:
        for _ in range(2):  # the second pass was prepared while the first drained
            sizes = [batch["gid"].shape[0] for batch in loader]
            want = [6] * (total // 6) + ([] if drop_last else [total % 6])
            assert sizes == want
            assert len(sizes) == len(loader)


def test_an_epoch_smaller_than_one_batch_is_an_error(store: ShardStore) -> None:
    """A batch larger than the epoch once gave 0 steps and a silent no-op; it is a ConfigError naming the fix."""
    ds = make(store, batch_size=64, k=1)
    with ShardLoader(ds) as loader:
        with pytest.raises(ConfigError, match=r"batch_size 64 per step is more than the \d+ samples of epoch 0 .*"
                                              r"0 steps; lower batch_size, or raise shards_per_epoch"):
            list(loader)
