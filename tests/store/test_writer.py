"""ShardWriter: round trips, the shard range, resuming, and refusing inconsistent samples."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from shardstore import ShardStore, ShardWriter, WriterError, build_manifest
from tests.conftest import sample_arrays, write_native


def read_all(root: Path) -> dict[str, np.ndarray]:
    build_manifest(root)
    store = ShardStore.open(root)
    return {f: np.concatenate([store.field(p, f) for p in range(store.num_shards)]) for f in store.fields}


def test_round_trip_native_several_dtypes(tmp_path: Path) -> None:
    root = write_native(tmp_path / "c", 10, 4)
    assert sorted(os.listdir(root / "shard_000000")) == ["feats.npy", "images.npy", "labels.npy"]
    got = read_all(root)
    want = sample_arrays(10)
    for name in want:
        assert got[name].dtype == want[name].dtype
        np.testing.assert_array_equal(got[name], want[name])
    rows = [np.load(root / f"shard_{i:06d}" / "labels.npy").shape[0] for i in range(3)]
    assert rows == [4, 4, 2]


def test_per_sample_add_equals_batch_add(tmp_path: Path) -> None:
    data = sample_arrays(9)
    with ShardWriter(tmp_path / "a", 4, fsync=False) as w:
        for i in range(9):
            w.add({k: v[i] for k, v in data.items()})
    write_native(tmp_path / "b", 9, 4)
    a, b = read_all(tmp_path / "a"), read_all(tmp_path / "b")
    for name in data:
        np.testing.assert_array_equal(a[name], b[name])


def test_scalar_labels_are_accepted_and_cast_safely(tmp_path: Path) -> None:
    with ShardWriter(tmp_path / "c", 2, fsync=False) as w:
        w.add({"x": np.zeros(3, np.float32), "y": 1})
        w.add({"x": np.zeros(3, np.float16), "y": 2})  # float16 -> float32 is a safe cast
    assert read_all(tmp_path / "c")["x"].dtype == np.float32


@pytest.mark.parametrize(
    ("second", "match"),
    [
        ({"x": np.zeros(4, np.float32), "y": 1}, r"per-sample shape \(4,\), expected \(3,\)"),
        ({"x": np.zeros(3, np.float64), "y": 1}, r"dtype float64, expected float32"),
        ({"x": np.zeros(3, np.float32)}, r"fields \['x'\] but the writer expects \['x', 'y'\]"),
    ],
)
def test_inconsistent_samples_are_refused(tmp_path: Path, second: dict, match: str) -> None:
    w = ShardWriter(tmp_path / "c", 2, fsync=False)
    w.add({"x": np.zeros(3, np.float32), "y": 0})
    with pytest.raises(WriterError, match=match):
        w.add(second)


def test_bad_field_names_and_object_dtype_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="field name '1bad' is not allowed"):
        ShardWriter(tmp_path / "c", 2).add({"1bad": np.zeros(1)})
    with pytest.raises(WriterError, match="store plain numeric arrays"):
        ShardWriter(tmp_path / "d", 2).add({"x": np.array([object()])})


def test_unequal_batch_lengths_are_refused(tmp_path: Path) -> None:
    with pytest.raises(WriterError, match="different lengths"):
        ShardWriter(tmp_path / "c", 2).add_batch({"x": np.zeros((3, 2)), "y": np.zeros(2)})


def test_exception_in_with_block_writes_no_short_shard(tmp_path: Path) -> None:
    root = tmp_path / "c"
    with pytest.raises(RuntimeError), ShardWriter(root, 4, fsync=False) as w:
        w.add_batch(sample_arrays(6))
        raise RuntimeError("producer failed")
    assert sorted(p.name for p in root.iterdir()) == ["shard_000000"]


def test_restart_skips_complete_shards_and_finishes(tmp_path: Path) -> None:
    root = tmp_path / "c"
    w = ShardWriter(root, 4, fsync=False)
    w.add_batch(sample_arrays(9))
    w.abort()  # as if killed: shards 0 and 1 are complete, one sample was buffered
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*.npy")}
    w2 = ShardWriter(root, 4, fsync=False)
    assert w2.samples_to_skip == 8 and w2.existing_shards == [0, 1]
    w2.add_batch(sample_arrays(10))
    w2.close()
    assert w2.samples_skipped == 8 and w2.samples_written == 2 and w2.shards_written == [2]
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())  # complete shards untouched
    np.testing.assert_array_equal(read_all(root)["images"], sample_arrays(10)["images"])


def test_skip_existing_lets_the_producer_skip_inputs(tmp_path: Path) -> None:
    root = write_native(tmp_path / "c", 8, 4)
    w = ShardWriter(root, 4, fsync=False)
    assert w.skip_existing() == 8
    w.add_batch(sample_arrays(3, start=8))
    w.close()
    np.testing.assert_array_equal(read_all(root)["images"], sample_arrays(11)["images"])


def test_appending_past_a_finished_short_shard_is_refused(tmp_path: Path) -> None:
    root = write_native(tmp_path / "c", 6, 4)  # shards of 4 and 2: that writer finished
    w = ShardWriter(root, 4, fsync=False)
    with pytest.raises(WriterError, match="already exists with 2 samples"):
        w.add_batch(sample_arrays(8))


def test_wrong_shard_size_on_restart_is_refused(tmp_path: Path) -> None:
    root = write_native(tmp_path / "c", 8, 4)
    with pytest.raises(WriterError, match="has 4 rows but shards of this writer hold 2"):
        ShardWriter(root, 2)


def test_range_is_respected_and_full_range_is_an_error(tmp_path: Path) -> None:
    root = tmp_path / "c"
    with ShardWriter(root, 2, start_shard=10, num_shards=2, fsync=False) as w:
        w.add_batch(sample_arrays(4))
        with pytest.raises(WriterError, match="range of 2 shards x 2 samples is full"):
            w.add(dict((k, v[0]) for k, v in sample_arrays(1).items()))
    assert sorted(p.name for p in root.iterdir()) == ["shard_000010", "shard_000011"]


def test_stride_interleaves_writers(tmp_path: Path) -> None:
    root = tmp_path / "c"
    for job in range(2):
        with ShardWriter(root, 2, start_shard=job, stride=2, fsync=False) as w:
            w.add_batch(sample_arrays(6, start=100 * job))
    assert sorted(p.name for p in root.iterdir()) == [f"shard_{i:06d}" for i in range(6)]
    got = read_all(root)["labels"]
    assert got.shape == (12,)


def test_stale_temporary_of_dead_writer_is_removed(tmp_path: Path) -> None:
    root = tmp_path / "c"
    root.mkdir()
    stale = root / ".shard_000000.tmp-999999999-deadbeef"  # no such pid
    stale.mkdir()
    (stale / "images.npy").write_bytes(b"partial")
    ShardWriter(root, 4)
    assert not stale.exists()


def test_root_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(WriterError, match="is not a directory"):
        ShardWriter(tmp_path / "f")


@pytest.mark.parametrize("kwargs", [{"shard_size": 0}, {"start_shard": -1}, {"num_shards": 0}, {"stride": 0}])
def test_invalid_ranges_are_refused(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(WriterError):
        ShardWriter(tmp_path / "c", **kwargs)
