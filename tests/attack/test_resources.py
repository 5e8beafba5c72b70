"""The loader under hostile conditions, each in its own process: a whole-cache epoch over 200 shards x 3 fields
with only 128 file descriptors (it finishes, and ``close()`` gives every descriptor back), and a shard file
truncated while the loader has it mapped (a ``CorruptShardError`` naming the file, not a SIGBUS)."""

from __future__ import annotations

import gc
import json
import os
import signal
from pathlib import Path

import pytest

from tests.conftest import write_native

from .harness import call, tiny_cache, warm

pytestmark = pytest.mark.slow
FD_LIMIT = 128


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def whole_epoch_under_a_low_fd_limit(root: str) -> int:
    """Child: iterate every shard once with RLIMIT_NOFILE at FD_LIMIT; report fds before, at most during, after."""
    from shardstore import ShardStore
    from shardstore.dataset.subset import RandomShardSubsetCachedDataset
    from shardstore.loader import ShardLoader

    store = ShardStore.open(root)
    dataset = RandomShardSubsetCachedDataset(store, shards_per_epoch=None, random_subset_seed=0, batch_size=16)
    before = _open_fds()
    loader = ShardLoader(dataset, num_threads=2)
    loader.set_epoch(0)
    samples, peak = 0, before
    for batch in loader:
        samples += int(batch["images"].shape[0])
        peak = max(peak, _open_fds())
    loader.close()
    gc.collect()
    print(json.dumps({"samples": samples, "total": store.num_samples, "shards": store.num_shards,
                      "before": before, "peak": peak, "after": _open_fds()}))
    return 0


def truncate_while_mapped(root: str) -> int:
    """Child: cut a shard file down to its header after the loader's first batch from it; report what happened."""
    import numpy as np

    from shardstore import CorruptShardError, ShardStore
    from shardstore.loader import ShardLoader

    store = ShardStore.open(root)
    victim = store.path(0, "images")
    want = np.concatenate([np.load(store.path(p, "images")) for p in range(store.num_shards)])
    loader = ShardLoader(store, batch_size=8, num_threads=1, prefetch=1, read_ahead_shards=0)
    batches = iter(loader)
    first = next(batches)
    os.truncate(victim, 128 + 8 * 3 * 16 * 16)  # the header and the first batch stay; 47 of 48 pages go
    taken, wrong = 1, int(not np.array_equal(first["images"].numpy(), want[:8]))
    try:
        for batch in batches:  # a batch gathered before the cut is fine; one with other bytes is not
            wrong += int(not np.array_equal(batch["images"].numpy(), want[8 * taken: 8 * taken + 8]))
            taken += 1
    except CorruptShardError as exc:
        print(json.dumps({"error": str(exc), "taken": taken, "wrong": wrong}))
        return 0
    finally:
        loader.close()
    print(json.dumps({"error": None, "taken": taken, "wrong": wrong}))
    return 3


def test_a_whole_cache_epoch_runs_under_128_file_descriptors(tmp_path: Path) -> None:
    root = write_native(tmp_path / "cache", 200 * 8, 8)  # 200 shards x images, labels, feats = 600 files
    from shardstore import build_manifest

    build_manifest(root)
    warm()
    outcome = call(__name__, "whole_epoch_under_a_low_fd_limit", str(root), nofile=FD_LIMIT, timeout=120)
    assert outcome.code == 0, outcome.describe()
    report = json.loads(outcome.out.strip().splitlines()[-1])
    assert report["shards"] == 200 and report["samples"] == report["total"] == 1600, report
    assert report["after"] == report["before"], f"close() kept file descriptors: {report}"
    print(f"\nattack RLIMIT_NOFILE={FD_LIMIT}: whole-cache epoch of {report['shards']} shards x 3 fields finished; "
          f"fds {report['before']} before, {report['peak']} at most, {report['after']} after close()")


def test_a_shard_truncated_while_mapped_is_a_corrupt_shard_error_not_sigbus(tmp_path: Path) -> None:
    root = tiny_cache(tmp_path / "cache", num_shards=3, shard_size=256)  # images: 196 KB per shard file
    warm()
    outcome = call(__name__, "truncate_while_mapped", str(root), timeout=120)
    assert outcome.code != -signal.SIGBUS, f"the loader died of SIGBUS: {outcome.describe()}"
    assert outcome.code == 0, outcome.describe()
    report = json.loads(outcome.out.strip().splitlines()[-1])
    assert "shard_000000/images.npy" in report["error"] and "\n" not in report["error"], report
    assert report["wrong"] == 0, f"batches with other bytes than the file held were handed out: {report}"
    print(f"\nattack truncated while mapped: after {report['taken']} batches: {report['error'][:200]}")

