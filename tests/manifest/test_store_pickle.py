"""A pickled ``ShardStore`` carries the path of its snapshot's table, never the table: a spawned DataLoader worker
or rank maps the columns again (10^6 shards: a pickle of a few KB, and next to no memory in each child)."""

from __future__ import annotations

import multiprocessing
import pickle
from pathlib import Path

import numpy as np
import pytest

from shardstore import ManifestError, ShardStore, ShardWriter, build_manifest
from tests.conftest import sample_arrays
from tests.manifest.synthetic import IMAGES, synthetic_columns, write_synthetic

NUM_SHARDS = 1_000_000


def rss_bytes() -> int:
    """This process's resident set (VmRSS of /proc/self/status)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def unpickle_in_child(payload: bytes, results) -> None:  # noqa: ANN001  (a multiprocessing queue)
    """Runs in a spawned child: unpickle the store, touch its last shard id, report what that cost in memory."""
    import shardstore.store.reader  # noqa: F401  (imports are not part of the cost measured)

    before = rss_bytes()
    store = pickle.loads(payload)
    last = int(store.shard_ids[-1])
    grown = rss_bytes() - before
    results.put({"grown": grown, "last": last, "num_shards": store.num_shards, "num_samples": store.num_samples,
                 "snapshot_id": store.snapshot_id, "format": store.manifest.format_version})


@pytest.mark.slow
def test_a_store_over_a_million_shards_is_not_copied_into_spawned_children(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    write_synthetic(root, NUM_SHARDS, IMAGES, samples=2048, offset=128)  # the table only; no shard files
    store = ShardStore.open(root)
    table_bytes = sum(c.nbytes for c in store.manifest.columns.values())
    assert store.num_shards == NUM_SHARDS and table_bytes > 30 * 2**20
    payload = pickle.dumps(store)
    assert len(payload) < 64 * 1024, f"the pickle holds {len(payload):,} bytes: the table went with it"

    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    children = [ctx.Process(target=unpickle_in_child, args=(payload, results)) for _ in range(2)]
    for child in children:
        child.start()
    reports = [results.get(timeout=120) for _ in children]
    for child in children:
        child.join(60)
        assert child.exitcode == 0
    for report in reports:
        assert report["last"] == NUM_SHARDS - 1 and report["num_shards"] == NUM_SHARDS
        assert report["num_samples"] == NUM_SHARDS * 2048 and report["format"] == 3
        assert report["snapshot_id"] == store.snapshot_id
        assert report["grown"] < table_bytes / 4, (
            f"a child grew by {report['grown']:,} bytes unpickling a store over a {table_bytes:,}-byte table")
    growth = ", ".join(f"{r['grown'] / 2**20:.2f} MiB" for r in reports)
    print(f"\nstore pickle: {NUM_SHARDS:,} shards, table {table_bytes / 2**20:.1f} MiB, pickle {len(payload):,} bytes, "
          f"child RSS growth {growth}")


def test_a_pickled_store_reopens_its_snapshot_by_path(native_cache: Path) -> None:
    build_manifest(native_cache)
    store = ShardStore.open(native_cache)
    payload = pickle.dumps(store)
    assert b"images" in payload and len(payload) < 8 * 1024
    again = pickle.loads(payload)
    assert again.snapshot_id == store.snapshot_id and again.shard_ids.tolist() == [0, 1, 2]
    assert not again.manifest.columns["id"].flags.writeable  # mapped from the table, not carried in the pickle
    np.testing.assert_array_equal(again.sample(9)["images"], sample_arrays(10)["images"][9])


def test_a_pickled_store_keeps_its_snapshot_while_the_cache_grows(native_cache: Path) -> None:
    build_manifest(native_cache)
    payload = pickle.dumps(ShardStore.open(native_cache))
    with ShardWriter(native_cache, 4, start_shard=3, fsync=False) as w:
        w.add_batch(sample_arrays(4, start=10))
    build_manifest(native_cache)  # a new snapshot; the previous table is kept
    assert pickle.loads(payload).shard_ids.tolist() == [0, 1, 2]  # what the parent planned its epoch on
    with ShardWriter(native_cache, 4, start_shard=4, fsync=False) as w:
        w.add_batch(sample_arrays(4, start=14))
    build_manifest(native_cache)  # replaced twice: that table is gone
    with pytest.raises(ManifestError, match=r"the manifest snapshot this store was opened on has been replaced "
                                            r"twice since; open the store again"):
        pickle.loads(payload)


def test_a_store_built_in_memory_pickles_its_columns(tmp_path: Path) -> None:
    """A manifest that is not a table on disk (a subset) has nothing to reopen: its columns travel (and are small)."""
    root = tmp_path / "cache"
    write_synthetic(root, 1000)
    part = ShardStore.open(root).subset(np.arange(0, 1000, 100))
    again = pickle.loads(pickle.dumps(part))
    assert again.shard_ids.tolist() == list(range(0, 1000, 100)) and again.num_samples == 10 * 2048
    for name, col in synthetic_columns(IMAGES, 1000).items():
        np.testing.assert_array_equal(again.manifest.columns[name], col[::100], err_msg=name)
