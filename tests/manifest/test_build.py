"""build_manifest: both layouts, each corruption kind left out with its message, incremental rebuilds."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from shardstore import ManifestError, ShardStore, build_manifest
from shardstore.store.manifest import Manifest
from shardstore.store.reader import load_manifest
from tests.conftest import sample_arrays, write_flat, write_native


def only_problem(root: Path) -> str:
    report = build_manifest(root)
    assert len(report.problems) == 1, report.problems
    return str(report.problems[0])


@pytest.mark.parametrize("layout", ["native", "flat"])
def test_round_trip_both_layouts(tmp_path: Path, layout: str) -> None:
    root = (write_native if layout == "native" else write_flat)(tmp_path / "c", 10, 4)
    report = build_manifest(root)
    assert report.problems == [] and report.path == root / "manifest.json"
    m = report.manifest
    assert [s.id for s in m.shards] == [0, 1, 2] and [s.num_samples for s in m.shards] == [4, 4, 2]
    assert {s.layout for s in m.shards} == {layout}
    assert {n: (f.dtype, f.shape) for n, f in m.fields.items()} == {
        "feats": (np.dtype(np.float16), (3,)),
        "images": (np.dtype(np.uint8), (2, 3, 4)),
        "labels": (np.dtype(np.int64), ()),
    }
    store = ShardStore.open(root)
    want = sample_arrays(10)
    for i in (0, 3, 4, 9):
        for name, arr in store.sample(i).items():
            np.testing.assert_array_equal(arr, want[name][i])


def test_flat_ids_are_numbers_and_field_names_may_hold_underscores(tmp_path: Path) -> None:
    root = tmp_path / "c"
    root.mkdir()
    for shard_id, digits in ((7, 5), (12, 2)):
        np.save(root / f"teacher_logits_{shard_id:0{digits}d}.npy", np.full((3, 5), shard_id, np.float16))
        np.save(root / f"images_{shard_id:0{digits}d}.npy", np.zeros((3, 2), np.uint8))
    m = build_manifest(root).manifest
    assert [s.id for s in m.shards] == [7, 12] and sorted(m.fields) == ["images", "teacher_logits"]
    assert m.shards[0].files["teacher_logits"].path == "teacher_logits_00007.npy"
    assert ShardStore.open(root).sample(3)["teacher_logits"].tolist() == [12] * 5


def test_a_flat_shard_whose_files_write_its_id_in_two_widths_is_left_out(tmp_path: Path) -> None:
    # The table derives every path from one id width per shard: images_00007 and labels_7 cannot both be found.
    root = write_flat(tmp_path / "c", 8, 4)
    os.rename(root / "labels_000001.npy", root / "labels_1.npy")
    report = build_manifest(root)
    assert [s.id for s in report.manifest.shards] == [0]
    assert [str(p) for p in report.problems] == [
        "labels_1.npy: its id is written with 1 digits, feats_000001.npy with 6; rename one so a shard's files share "
        "one width; the shard is left out"]


def test_json_round_trip_and_relative_paths(native_cache: Path) -> None:
    m = build_manifest(native_cache, checksum=True).manifest
    doc = json.loads((native_cache / "manifest.json").read_text())
    assert doc["format"] == "shardstore-manifest" and doc["version"] == 3
    assert doc["layouts"]["native"] == "shard_{id}/{field}.npy" and doc["table"].startswith("manifest.d/")
    read = load_manifest(native_cache)
    assert read == m and read.snapshot_id == m.snapshot_id
    assert read.shards[0].files["images"].path == "shard_000000/images.npy"
    again = Manifest.from_json(m.to_json())  # the format-2 document (all JSON) says the same
    assert again.format_version == 2 and again.to_json() == m.to_json() and again.snapshot_id == m.snapshot_id
    assert all(f.checksum.startswith("sha256:") for s in again.shards for f in s.files.values())


# -- corruption: each kind is left out with one line naming the file and why ---------------


def test_truncated_file(native_cache: Path) -> None:
    path = native_cache / "shard_000001" / "images.npy"
    size = path.stat().st_size
    os.truncate(path, size - 5)
    assert only_problem(native_cache) == (
        f"shard_000001/images.npy: header promises {size:,} bytes, file has {size - 5:,} (truncated); "
        "the shard is left out"
    )


def test_extra_bytes_after_data(native_cache: Path) -> None:
    with open(native_cache / "shard_000000" / "labels.npy", "ab") as f:
        f.write(b"\0" * 3)
    assert "shard_000000/labels.npy: " in only_problem(native_cache)
    assert "(3 unexpected bytes after the data)" in only_problem(native_cache)


def test_unreadable_header(native_cache: Path) -> None:
    (native_cache / "shard_000002" / "feats.npy").write_bytes(b"this is not numpy at all")
    assert only_problem(native_cache).startswith(
        "shard_000002/feats.npy: not an .npy file (it starts with b'this is ', not the .npy magic"
    )
    (native_cache / "shard_000002" / "feats.npy").write_bytes(b"\x93NUMPY\x01\x00\x04\x00{'a'")
    assert only_problem(native_cache).startswith("shard_000002/feats.npy: unreadable .npy header (")


def test_empty_and_text_files_are_named_for_what_they_are(native_cache: Path) -> None:
    (native_cache / "shard_000001" / "labels.npy").write_bytes(b"")
    assert only_problem(native_cache) == "shard_000001/labels.npy: empty file (0 bytes); the shard is left out"
    (native_cache / "shard_000001" / "labels.npy").write_text("id,label\n1,cat\n" * 20)
    problem = only_problem(native_cache)
    assert "not an .npy file" in problem and "pickle" not in problem and "interrupted" not in problem


def test_unequal_lengths(flat_cache: Path) -> None:
    np.save(flat_cache / "labels_000001.npy", np.zeros(3, np.int64))
    assert only_problem(flat_cache) == (
        "labels_000001.npy: 3 samples, but feats_000001.npy has 4 (fields of unequal length); the shard is left out"
    )


def test_missing_field_native_and_flat(native_cache: Path, flat_cache: Path) -> None:
    (native_cache / "shard_000001" / "feats.npy").unlink()
    assert only_problem(native_cache) == (
        "shard_000001/feats.npy: field 'feats' is missing (the other shards have it); the shard is left out"
    )
    (flat_cache / "images_000002.npy").unlink()
    assert only_problem(flat_cache).startswith("images_000002.npy: field 'images' is missing")


def test_dtype_differs_from_other_shards(native_cache: Path) -> None:
    np.save(native_cache / "shard_000002" / "labels.npy", np.zeros(2, np.int32))
    assert only_problem(native_cache) == (
        "shard_000002/labels.npy: dtype int32, but the other shards' 'labels' is int64; the shard is left out"
    )


def test_shape_differs_from_other_shards(native_cache: Path) -> None:
    np.save(native_cache / "shard_000000" / "images.npy", np.zeros((4, 2, 3, 5), np.uint8))
    assert only_problem(native_cache) == (
        "shard_000000/images.npy: per-sample shape [2, 3, 5], but the other shards' 'images' is [2, 3, 4]; "
        "the shard is left out"
    )


def test_object_dtype_is_refused_without_unpickling(native_cache: Path) -> None:
    np.save(native_cache / "shard_000001" / "labels.npy", np.array([object()] * 4), allow_pickle=True)
    assert "holds Python objects, which are never loaded (no pickle)" in only_problem(native_cache)


def test_fortran_order_and_zero_d(native_cache: Path) -> None:
    np.save(native_cache / "shard_000001" / "feats.npy", np.asfortranarray(np.zeros((4, 3), np.float16)))
    assert "Fortran order" in only_problem(native_cache)
    np.save(native_cache / "shard_000001" / "feats.npy", np.float16(1))
    assert "0-d array" in only_problem(native_cache)


def test_same_id_in_both_layouts(native_cache: Path) -> None:
    for name, arr in sample_arrays(4).items():
        np.save(native_cache / f"{name}_000000.npy", arr)
    report = build_manifest(native_cache)
    assert [s.id for s in report.manifest.shards] == [1, 2]
    assert "shard id 0 is also" in str(report.problems[0]) and "keep one" in str(report.problems[0])


def test_same_id_twice_in_flat_layout(flat_cache: Path) -> None:
    shutil.copy(flat_cache / "images_000001.npy", flat_cache / "images_1.npy")
    assert "shard id 1 of field 'images' is also" in only_problem(flat_cache)


def test_temporary_names_are_ignored_silently(native_cache: Path) -> None:
    tmp = native_cache / ".shard_000003.tmp-123-abcd"
    tmp.mkdir()
    (tmp / "images.npy").write_bytes(b"partial")
    (native_cache / "images_000009.npy.tmp").write_bytes(b"x")
    (native_cache / ".labels_000009.npy").write_bytes(b"x")
    (native_cache / "shard_000000" / ".images.npy.tmp-1-2").write_bytes(b"x")
    report = build_manifest(native_cache)
    assert report.problems == [] and len(report.manifest.shards) == 3


def test_left_out_shards_are_recorded_in_the_manifest(native_cache: Path) -> None:
    (native_cache / "shard_000001" / "feats.npy").unlink()
    build_manifest(native_cache)
    m = ShardStore.open(native_cache).manifest
    assert [s.id for s in m.shards] == [0, 2] and m.left_out[0].shard_id == 1


def test_majority_decides_the_reference_dtype(native_cache: Path) -> None:
    # One odd shard out of three: the odd one is left out, not the two that agree.
    np.save(native_cache / "shard_000000" / "labels.npy", np.zeros(4, np.int16))
    report = build_manifest(native_cache)
    assert report.manifest.fields["labels"].dtype == np.int64
    assert [p.shard_id for p in report.problems] == [0]


@pytest.mark.parametrize(
    ("num_shards", "with_extra", "required"),
    [(4, 2, True), (4, 1, False), (3, 2, True), (3, 1, False), (2, 1, True), (4, 3, True)],
)
def test_majority_rule_boundary(tmp_path: Path, num_shards: int, with_extra: int, required: bool) -> None:
    # A field in at least half of the shards is required (the shards without it are left out); below half it is ignored.
    root = write_native(tmp_path / "c", 4 * num_shards, 4)
    for shard_id in range(with_extra):
        np.save(root / f"shard_{shard_id:06d}" / "extra.npy", np.zeros(4, np.int32))
    report = build_manifest(root)
    if required:
        assert "extra" in report.manifest.fields and report.ignored_fields == {}
        assert [s.id for s in report.manifest.shards] == list(range(with_extra))
        assert [p.shard_id for p in report.problems] == list(range(with_extra, num_shards))
        assert all("field 'extra' is missing (the other shards have it)" in p.reason for p in report.problems)
    else:
        assert "extra" not in report.manifest.fields and report.ignored_fields == {"extra": with_extra}
        assert len(report.manifest.shards) == num_shards and report.problems == []


# -- incremental rebuilds of a growing cache -------------------------------------------------


def test_growing_cache_is_rebuilt_incrementally(tmp_path: Path) -> None:
    root = write_native(tmp_path / "c", 8, 4, num_shards=2)
    first = build_manifest(root)
    assert first.headers_read == 6 and first.files_reused == 0
    write_native(root, 12, 4, start_shard=2)  # a second writer adds shards 2, 3, 4
    second = build_manifest(root)
    # The 9 files of the new shards, and one file per field of a kept shard to check the table against;
    # a stat for each file and directory of the kept shards.
    assert second.headers_read == 9 + 3 and second.files_reused == 6 and second.paths_compared == 6 + 2
    assert [s.id for s in second.manifest.shards] == [0, 1, 2, 3, 4] and second.manifest.num_samples == 20
    third = build_manifest(root)
    assert third.headers_read == 3 and third.files_reused == 15 and third.unchanged
    assert third.manifest.snapshot_id == second.manifest.snapshot_id


def test_new_file_content_without_recorded_checksum_is_read_again(native_cache: Path) -> None:
    build_manifest(native_cache)
    path = native_cache / "shard_000001" / "labels.npy"
    np.save(path, np.arange(5, dtype=np.int64))
    report = build_manifest(native_cache)
    assert report.files_reused == 8 and report.changed == []
    assert [s.id for s in report.manifest.shards] == [0, 2] and "unequal length" in str(report.problems[0])


def test_full_rebuild_reads_every_header(native_cache: Path) -> None:
    build_manifest(native_cache)
    full = build_manifest(native_cache, incremental=False)
    assert full.headers_read == 9 and full.files_reused == 0 and full.paths_compared == 0 and not full.unchanged


def test_corrupt_previous_manifest_means_full_rebuild(native_cache: Path, caplog: pytest.LogCaptureFixture) -> None:
    (native_cache / "manifest.json").write_text("{not json")
    report = build_manifest(native_cache)
    assert report.headers_read == 9 and "ignoring the existing manifest" in caplog.text


def test_manifest_write_is_atomic_and_leaves_no_temporary(native_cache: Path) -> None:
    build_manifest(native_cache)
    write_native(native_cache, 4, 4, start_shard=3, journal=True)
    build_manifest(native_cache)
    hidden = [p.name for p in native_cache.iterdir() if p.name.startswith(".")]
    assert hidden == [".shardstore-journal"]  # the writers' journal, not a temporary
    assert [p.name for p in (native_cache / "manifest.d").iterdir() if p.name.startswith(".")] == []


def test_reading_never_modifies_shards(native_cache: Path) -> None:
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in native_cache.glob("shard_*/*.npy")}
    build_manifest(native_cache, checksum=True)
    build_manifest(native_cache)
    store = ShardStore.open(native_cache)
    _ = [store.sample(i) for i in range(store.num_samples)]
    assert before == {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in native_cache.glob("shard_*/*.npy")}


@pytest.mark.parametrize(
    ("setup", "match"),
    [
        (lambda p: None, r"does not exist; pass the directory that holds the shards"),
        (lambda p: p.write_text("x"), r"is not a directory"),
        (lambda p: p.mkdir(), r"no shards in .*; expected shard_<id>/<field>.npy"),
    ],
)
def test_root_errors(tmp_path: Path, setup, match: str) -> None:
    root = tmp_path / "root"
    setup(root)
    with pytest.raises(ManifestError, match=match):
        build_manifest(root)


def test_no_manifest_written_when_every_shard_is_bad(tmp_path: Path) -> None:
    root = tmp_path / "c"
    root.mkdir()
    (root / "images_000000.npy").write_bytes(b"garbage")
    report = build_manifest(root)
    assert report.manifest.shards == [] and len(report.problems) == 1 and report.path is None
    assert not (root / "manifest.json").exists()
