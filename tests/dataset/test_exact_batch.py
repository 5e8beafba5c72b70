"""An epoch holding exactly one global batch has one step, not a "too small" error."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shardstore import ShardStore, ShardWriter, build_manifest
from shardstore.dataset.subset import RandomShardSubsetCachedDataset


def test_epoch_of_exactly_one_global_batch_yields_one_batch(tmp_path: Path) -> None:
    with ShardWriter(tmp_path, 4, fsync=False) as w:
        w.add_batch({"gid": np.arange(8, dtype=np.int64)})
    build_manifest(tmp_path)
    store = ShardStore.open(tmp_path)
    ds = RandomShardSubsetCachedDataset(store, 2, 0, batch_size=8)  # both shards: 8 samples, one batch of 8
    ds.set_epoch(0)
    assert ds.steps_per_epoch == 1
    assert len(ds) == 8
    assert sorted(int(ds[i]["gid"]) for i in range(len(ds))) == list(range(8))
