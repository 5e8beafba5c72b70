"""A shard file truncated while it is mapped is an error naming the file, at the batch that needs it (not SIGBUS).

Each case runs in a subprocess: without the guard the process dies of SIGBUS ("Bus error", 135).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import write_gid_cache

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]

LOADER = r"""
import json, os, sys
import numpy as np
from shardstore import CorruptShardError, ShardStore
from shardstore.dataset.subset import RandomShardSubsetCachedDataset
from shardstore.loader import ShardLoader

root, field, num_threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
store = ShardStore.open(root)
ds = RandomShardSubsetCachedDataset(store, None, 3, batch_size=8)
positions = store.locate(ds.indices())[0]
victim = int(positions[len(positions) // 2])  # a shard in the middle of the epoch
path = store.path(victim, field)
for p in range(store.num_shards):
    store.shard(p)  # every file mapped (as a running loader has them) ...
os.truncate(path, 0)  # ... when one shrinks under its map
seen = []
try:
    with ShardLoader(ds, num_threads=num_threads) as loader:
        for batch in loader:
            seen.append(batch["gid"].numpy().copy())
except CorruptShardError as exc:
    error = str(exc)
else:
    error = None
ids = ds.indices()
first = int(np.flatnonzero(positions == victim)[0])
print(json.dumps({"path": str(path), "error": error, "seen": len(seen), "want_seen": first // 8,
                  "batches_ok": all(np.array_equal(b, ids[8 * i : 8 * i + 8]) for i, b in enumerate(seen))}))
"""

DATASET = r"""
import json, os, sys
from pathlib import Path
import numpy as np
from shardstore import CorruptShardError, ShardStore
from shardstore.dataset.cached import CachedTensorDataset
from shardstore.loader import pager

root = sys.argv[1]
store = ShardStore.open(root)
path = store.path(2, "image")
arrays = [store.field(2, name) for name in store.fields]
os.truncate(path, 0)
pager.read_ahead(arrays, [path])  # MADV_POPULATE_READ on the lost pages: refused, not SIGBUS
pager.drop_pages(arrays, [path])
ds = CachedTensorDataset(store)
try:
    ds[int(store.offsets[2]) + 1]
except CorruptShardError as exc:
    error = str(exc)
else:
    error = None
try:
    store.read(2, "image", slice(0, 2))  # what cache-teacher reads a shard's images with
except CorruptShardError as exc:
    read_error = str(exc)
else:
    read_error = None
print(json.dumps({"path": str(path), "error": error, "read_error": read_error,
                  "other_shard_ok": int(ds[0]["gid"]) == 0}))
"""


def run(script: str, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # -X faulthandler: another SIGBUS handler installed first (as under pytest) must not take our faults.
    proc = subprocess.run([sys.executable, "-X", "faulthandler", "-c", script, *args], capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode not in (135, -signal.SIGBUS), f"killed by SIGBUS:\n{proc.stderr[-2000:]}"
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(("field", "num_threads"), [("image", 2), ("gid", 1)])
def test_a_shard_truncated_while_mapped_is_named_at_the_batch_that_reads_it(tmp_path: Path, field: str,
                                                                              num_threads: int) -> None:
    root = write_gid_cache(tmp_path / "cache", image_shape=(3, 32, 32))
    out = run(LOADER, str(root), field, str(num_threads))
    assert out["error"] is not None, "the loader read a truncated shard without an error"
    assert out["error"].startswith(f"{out['path']}: file shrank to 0 bytes while mapped (expected ")
    assert "build-manifest" in out["error"] and "\n" not in out["error"]
    # Every batch before the first one that reads the shard arrived, and was right.
    assert out["seen"] == out["want_seen"] and out["batches_ok"]


def test_the_dataset_and_the_pager_survive_a_truncated_map(tmp_path: Path) -> None:
    root = write_gid_cache(tmp_path / "cache", image_shape=(3, 32, 32))
    out = run(DATASET, str(root))
    for error in (out["error"], out["read_error"]):
        assert error is not None and error.startswith(f"{out['path']}: file shrank to 0 bytes while mapped")
    assert out["other_shard_ok"]
