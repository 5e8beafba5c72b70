"""ShardStore: opening through the manifest, its errors, and read-only zero-copy bounded maps."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from shardstore import CorruptShardError, ManifestError, ShardStore, build_manifest
from tests.conftest import sample_arrays, write_native
from tests.manifest.synthetic import write_synthetic


def test_missing_manifest(native_cache: Path) -> None:
    with pytest.raises(ManifestError, match=r"manifest.json does not exist; run `shardstore build-manifest .*` first"):
        ShardStore.open(native_cache)


def test_root_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="does not exist; pass the cache directory"):
        ShardStore.open(tmp_path / "nope")


def _first_batch_error(store: ShardStore) -> str:
    """The error a loader over every shard of ``store`` stops with (reading the shards in id order)."""
    from shardstore.dataset.subset import RandomShardSubsetCachedDataset
    from shardstore.loader import ShardLoader

    dataset = RandomShardSubsetCachedDataset(store, None, 0, batch_size=2, sample_order="sequential")
    with pytest.raises(CorruptShardError) as info, ShardLoader(dataset, num_threads=1) as loader:
        for _ in loader:
            pass
    return str(info.value)


def test_vanished_file_is_named_at_first_use_and_by_check_all(native_cache: Path) -> None:
    build_manifest(native_cache)
    path = native_cache / "shard_000001" / "labels.npy"
    path.unlink()
    store = ShardStore.open(native_cache)  # opening reads the manifest only
    store.field(0, "labels")
    message = (rf"{path}: file listed in the manifest has vanished; restore it, or rebuild the manifest with "
               r"`shardstore build-manifest`")
    with pytest.raises(CorruptShardError, match=message):
        store.field(1, "labels")
    with pytest.raises(CorruptShardError, match=message):
        store.sample(5)
    assert re.search(message, _first_batch_error(ShardStore.open(native_cache)))
    with pytest.raises(ManifestError, match=rf"{path}: listed in the manifest but missing; run "
                       rf"`shardstore build-manifest {native_cache}`"):
        ShardStore.open(native_cache, check="all")


def test_changed_size_is_named_at_first_use_and_by_check_all(native_cache: Path) -> None:
    build_manifest(native_cache)
    path = native_cache / "shard_000000" / "labels.npy"
    np.save(path, np.zeros(5, np.int64))
    store = ShardStore.open(native_cache)
    message = (rf"{path}: file has 168 bytes, the manifest promises 160 \(changed since the manifest was built\); "
               r"restore it, or rebuild the manifest with `shardstore build-manifest`")
    with pytest.raises(CorruptShardError, match=message):
        store.field(0, "labels")
    assert re.search(message, _first_batch_error(ShardStore.open(native_cache)))
    with pytest.raises(ManifestError,
                       match=r"labels.npy: changed size since the manifest was built \(160 -> 168 bytes\)"):
        ShardStore.open(native_cache, check="all")


def test_new_mtime_same_size_warns_at_first_map(native_cache: Path, caplog: pytest.LogCaptureFixture) -> None:
    build_manifest(native_cache)
    path = native_cache / "shard_000000" / "labels.npy"
    os.utime(path, ns=(5, 5))
    store = ShardStore.open(native_cache)
    store.field(1, "labels")
    assert "new mtime" not in caplog.text  # an untouched file maps silently
    np.testing.assert_array_equal(store.field(0, "labels"), sample_arrays(4)["labels"])
    assert f"{path} has a new mtime but the size the manifest records" in caplog.text
    caplog.clear()
    ShardStore.open(native_cache, check="all")
    assert "1 shard files" in caplog.text and "new mtime" in caplog.text


def _format2(root: Path) -> dict:
    """Build, then replace manifest.json by the same manifest in format 2 (all JSON), returned as a document."""
    doc = json.loads(build_manifest(root).manifest.to_json())
    assert doc["version"] == 2
    return doc


@pytest.mark.parametrize("bad_path", ["/etc/passwd", "../outside.npy", "shard_000000/../../x.npy"])
def test_format2_paths_outside_root_are_refused(native_cache: Path, bad_path: str) -> None:
    doc = _format2(native_cache)
    doc["shards"][0]["files"]["labels"]["path"] = bad_path
    (native_cache / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match="points outside the cache root"):
        ShardStore.open(native_cache)


def test_symlink_escaping_root_is_refused_with_a_fix_that_works(native_cache: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    build_manifest(native_cache)  # the shard was inside when the manifest was built
    (native_cache / "shard_000002").rename(outside / "shard_000002")
    (native_cache / "shard_000002").symlink_to(outside / "shard_000002")
    store = ShardStore.open(native_cache)  # files are checked when first mapped
    store.field(0, "images")
    with pytest.raises(CorruptShardError, match=r"shard_000002/images.npy resolves to .*outside/shard_000002/images"
                       r".npy, outside the cache root; replace the symlink with the file itself, or move what it "
                       r"points to inside the cache root; then rebuild the manifest with `shardstore build-manifest`"):
        store.field(2, "images")
    assert len(store._maps) == 1  # nothing outside was mapped
    with pytest.raises(ManifestError, match=r"manifest.json lists shard_000002/\w+.npy resolves to .*outside/"
                       r"shard_000002/\w+.npy, outside the cache root; replace the symlink with the file itself, or "
                       r"move what it points to inside the cache root, then run `shardstore build-manifest .*`"):
        ShardStore.open(native_cache, check="all")
    # Doing what the message says works (no loop): a rebuild alone leaves the linked shard out ...
    report = build_manifest(native_cache)
    assert [s.id for s in report.manifest.shards] == [0, 1] and "outside the cache root" in str(report.problems[0])
    assert ShardStore.open(native_cache, check="all").num_shards == 2
    # ... and replacing the symlink with the files brings it back.
    (native_cache / "shard_000002").unlink()
    (outside / "shard_000002").rename(native_cache / "shard_000002")
    build_manifest(native_cache)
    assert ShardStore.open(native_cache, check="all").num_shards == 3


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda d: d.update(format="other"), "not a shardstore manifest"),
        (lambda d: d.update(version=99), "version 99 is newer"),
        (lambda d: d["fields"].update(labels={"dtype": "O", "shape": []}), "not allowed"),
        (lambda d: d["shards"][0].pop("num_samples"), "malformed entry"),
    ],
)
def test_malformed_format2_manifest(native_cache: Path, edit, match: str) -> None:
    doc = _format2(native_cache)
    edit(doc)
    (native_cache / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match=match):
        ShardStore.open(native_cache)


def test_fields_are_read_only_zero_copy_maps(native_cache: Path) -> None:
    build_manifest(native_cache)
    store = ShardStore.open(native_cache)
    images = store.field(1, "images")
    assert not images.flags.writeable and not images.flags.owndata
    with pytest.raises(ValueError):
        images[0, 0, 0, 0] = 1
    assert store.field(1, "images") is images  # cached map, not a copy
    view = store.sample(5)["images"]
    assert np.shares_memory(view, images)
    np.testing.assert_array_equal(view, sample_arrays(10)["images"][5])


def test_open_maps_are_bounded_and_evicted_arrays_stay_valid(tmp_path: Path) -> None:
    root = write_native(tmp_path / "c", 40, 4)
    build_manifest(root)
    store = ShardStore.open(root, max_open_maps=3)
    first = store.field(0, "images")
    for p in range(store.num_shards):
        store.field(p, "images")
        assert len(store._maps) <= 3
    np.testing.assert_array_equal(first, sample_arrays(4)["images"])  # still readable after eviction


def test_locate_and_sample_bounds(native_cache: Path) -> None:
    build_manifest(native_cache)
    store = ShardStore.open(native_cache)
    pos, row = store.locate(np.array([0, 3, 4, 9]))
    assert pos.tolist() == [0, 0, 1, 2] and row.tolist() == [0, 3, 0, 1]
    with pytest.raises(IndexError, match=r"sample id 10 is out of range \[0, 10\)"):
        store.sample(10)
    with pytest.raises(IndexError, match="out of range"):
        store.locate(np.array([10]))
    with pytest.raises(KeyError, match="no field 'nope'"):
        store.field(0, "nope")


def test_file_truncated_after_open_is_a_clear_error(native_cache: Path) -> None:
    build_manifest(native_cache)
    store = ShardStore.open(native_cache)
    os.truncate(native_cache / "shard_000001" / "images.npy", 100)
    with pytest.raises(CorruptShardError, match=r"images.npy: file has 100 bytes, the manifest promises"):
        store.field(1, "images")


def test_manifest_without_shards_is_a_clear_error(native_cache: Path, tmp_path: Path) -> None:
    doc = _format2(native_cache)
    doc["shards"] = []
    (native_cache / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match="lists no shards; write some and rebuild the manifest"):
        ShardStore.open(native_cache)
    empty = tmp_path / "empty"
    write_synthetic(empty, 0)  # format 3, an empty table
    with pytest.raises(ManifestError, match="empty/manifest.json lists no shards; write some and rebuild the manifest"):
        ShardStore.open(empty)


def test_subset_keeps_chosen_shards_in_id_order(native_cache: Path) -> None:
    build_manifest(native_cache)
    store = ShardStore.open(native_cache)
    part = store.subset([2, 0])
    assert part.shard_ids.tolist() == [0, 2] and part.num_samples == 4 + 2
    assert part.sample(4)["labels"] == store.sample(8)["labels"]  # global id 4 of the subset is shard 2, row 0
    assert part.snapshot_id != store.snapshot_id
    with pytest.raises(IndexError, match="shard positions must be in \\[0, 3\\)"):
        store.subset([3])


def test_relative_path_names_the_file_under_the_root(native_cache: Path) -> None:
    build_manifest(native_cache)
    store = ShardStore.open(native_cache)
    last = store.num_shards - 1
    rel = store.relative_path(last, "images")
    assert not Path(rel).is_absolute() and store.root / rel == store.path(last, "images")
    assert rel == f"shard_{int(store.shard_ids[last]):06d}/images.npy"
