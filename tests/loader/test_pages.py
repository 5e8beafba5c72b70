"""Page cache: memory stays flat over many epochs; finished shards can be dropped; next shards are read ahead."""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path

import numpy as np
import pytest

from shardstore import ShardStore, pagecache
from shardstore.dataset.subset import RandomShardSubsetCachedDataset
from shardstore.loader import ShardLoader
from shardstore.loader.pager import evict

from .conftest import write_gid_cache


def anonymous_kib() -> int:
    """This process's anonymous memory (heap, buffers): file pages of the maps do not count."""
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Anonymous:"):
                return int(line.split()[1])
    raise AssertionError("no Anonymous line in /proc/self/smaps_rollup")


def mapped_files(root: Path) -> int:
    with open("/proc/self/maps") as f:
        return sum(str(root) in line for line in f)


@pytest.fixture(scope="module")
def bigger_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 shards of 256 samples (3x16x16 images): about 10 MB."""
    root = write_gid_cache(tmp_path_factory.mktemp("pages"), [256] * 48, (3, 16, 16))
    os.sync()  # written back, so the page cache may drop it
    return root


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup"), reason="needs Linux /proc")
@pytest.mark.parametrize("drop_pages", [False, True])
@pytest.mark.slow
def test_memory_does_not_grow_with_epochs(bigger_root: Path, drop_pages: bool) -> None:
    store = ShardStore.open(bigger_root, max_open_maps=16)
    ds = RandomShardSubsetCachedDataset(store, 8, 5, batch_size=32, max_steps_per_epoch=40)
    samples = 0
    with ShardLoader(ds, drop_pages=drop_pages) as loader:
        readings = []
        for epoch in range(50):
            loader.set_epoch(epoch)
            for batch in loader:
                samples += batch["gid"].shape[0]
            if epoch in (9, 49):
                gc.collect()
                readings.append(anonymous_kib())
        for _ in range(100):  # the pager drops finished epochs' maps in the background
            if (maps := mapped_files(bigger_root)) <= 16 + 3 * 2 * 3:
                break
            time.sleep(0.02)
    assert samples == 50 * 40 * 32
    # Each epoch plans ~2K ids (several arrays of them); a leak of them, of a job or of a
    # buffer per epoch would add megabytes over 40 epochs.
    assert readings[1] - readings[0] < 2048, f"anonymous memory grew from {readings[0]} to {readings[1]} KiB"
    # The map cache holds 16; the jobs in flight (this epoch, the next) hold their shards' three fields.
    assert maps <= 16 + 3 * 2 * 3, f"{maps} shard files still mapped"


def _residency(paths: list[Path]) -> list[float]:
    return [pagecache.resident_fraction(p) for p in paths]


def _evictable(root: Path) -> bool:
    probe = next(root.glob("shard_*/gid.npy"))
    with open(probe, "rb") as f:
        f.read()
    evict([probe])
    return pagecache.resident_fraction(probe) < 0.5


def test_finished_shards_are_dropped_and_next_ones_read_ahead(bigger_root: Path) -> None:
    if not _evictable(bigger_root):
        pytest.skip("this filesystem keeps evicted pages (tmpfs?)")
    store = ShardStore.open(bigger_root)
    ds = RandomShardSubsetCachedDataset(store, 6, 11, batch_size=32)
    files = lambda ids: [store.path(int(np.flatnonzero(store.shard_ids == i)[0]), name)  # noqa: E731
                         for i in ids for name in store.fields]
    evict([p for p in bigger_root.glob("shard_*/*.npy")])
    with ShardLoader(ds, drop_pages=True, read_ahead_shards=2) as loader:
        it = iter(loader)
        next(it)
        # The pager read the first shards ahead of the fillers.
        ahead = files(ds.selected_shards[:3])
        for _ in range(200):
            if min(_residency(ahead)) > 0.9:
                break
            time.sleep(0.01)
        assert min(_residency(ahead)) > 0.9, _residency(ahead)
        for _ in it:
            pass
        this_epoch = set(ds.selected_shards)
        loader.set_epoch(1)
        next_epoch = set(ds.selected_shards)
        gone = files(sorted(this_epoch - next_epoch))
        for _ in range(200):  # the pager drops them shortly after the epoch ends
            if max(_residency(gone)) < 0.1:
                break
            time.sleep(0.01)
        assert max(_residency(gone)) < 0.1, _residency(gone)
