"""Maps hold no file descriptor, the loader lets go of the maps of finished shards, and ``close()`` releases all."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shardstore import ShardStore
from shardstore.dataset.subset import RandomShardSubsetCachedDataset
from shardstore.loader import ShardLoader

from .conftest import write_gid_cache

REPO = Path(__file__).resolve().parents[2]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def maps_of(root: Path) -> int:
    """Memory maps of shard files under ``root`` in this process (the manifest's own column maps not counted)."""
    with open("/proc/self/maps") as f:
        return sum(str(root) in line and "/manifest.d/" not in line for line in f)


def test_close_releases_every_descriptor_and_the_epochs_maps(tmp_path: Path) -> None:
    root = write_gid_cache(tmp_path / "cache")
    store = ShardStore.open(root, max_open_maps=2)
    dataset = RandomShardSubsetCachedDataset(store, None, 5, batch_size=8)  # its shared epoch cell holds one
    before = open_fds()
    # Idle between epochs (no next epoch prepared, no read-ahead): no thread opens a file while we count.
    loader = ShardLoader(dataset, prepare_next_epoch=False, read_ahead_shards=0)
    for epoch in range(2):
        loader.set_epoch(epoch)
        assert sum(1 for _ in loader) == len(loader)
        assert open_fds() == before  # a map needs no descriptor once mapped
    loader.close()
    assert open_fds() == before
    assert maps_of(root) <= 2  # what the store's cache keeps: max_open_maps
    # Stopped mid-epoch, the loader still holds the maps of batches it prepared: close() lets go of them.
    loader = ShardLoader(dataset)
    for i, _ in enumerate(loader):
        if i == 3:
            break
    loader.close()
    assert open_fds() == before
    assert maps_of(root) <= 2


LOW_LIMIT = r"""
import json, resource, sys
from shardstore import ShardStore
from shardstore.dataset.subset import RandomShardSubsetCachedDataset
from shardstore.loader import ShardLoader

root = sys.argv[1]
def maps():
    with open("/proc/self/maps") as f:
        return sum(root in line and "/manifest.d/" not in line for line in f)
resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
store = ShardStore.open(root, max_open_maps=8)
peak, counts = 0, []
for dataset in (RandomShardSubsetCachedDataset(store, None, 0, batch_size=8), store):
    with ShardLoader(dataset, 8) as loader:
        n = 0
        for batch in loader:
            n += batch["gid"].shape[0]
            peak = max(peak, maps())
        counts.append(n)
print(json.dumps({"counts": counts, "total": store.num_samples, "peak_maps": peak, "maps_after_close": maps()}))
"""


@pytest.mark.slow
def test_a_whole_cache_epoch_under_a_low_descriptor_limit(tmp_path: Path) -> None:
    """300 shards x 3 fields read whole under ``ulimit -n 256``; the maps alive stay far below one per file."""
    root = write_gid_cache(tmp_path / "cache", [4] * 300)
    proc = subprocess.run([sys.executable, "-c", LOW_LIMIT, str(root)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["counts"] == [out["total"], out["total"]]
    # The maps of shards the consumer is done with go: what is alive is the ring's window, not the epoch.
    assert out["peak_maps"] <= 900 // 3
    assert out["maps_after_close"] <= 8
