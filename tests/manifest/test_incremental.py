"""Incremental build-manifest: exactly the new and changed shards are read, the rest is copied from the previous table.

Counts are exact: ``headers_read`` is the number of files whose first page was read. An
incremental build also reads one file per field of a kept shard (the spot check), so with
``F`` fields and nothing changed it reads ``F`` headers.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import shardstore.manifest.discover as discover
from shardstore import ShardStore, ShardWriter, build_manifest
from shardstore.store.groups import GroupSpec, add_shard_fields, write_group_spec
from shardstore.store.manifest import FieldSpec
from shardstore.store.reader import load_manifest
from shardstore.store.snapshot import TABLE_DIR
from shardstore.store.writer import JOURNAL_NAME
from tests.conftest import sample_arrays, write_flat

FIELDS = 3  # images, labels, feats


def write_native(root: Path, n: int, shard_size: int = 4, **kwargs) -> Path:
    kwargs.setdefault("fsync", False)
    with ShardWriter(root, shard_size, **kwargs) as w:
        w.add_batch(sample_arrays(n, kwargs.get("start_shard", 0) * shard_size))
    return root


def write_by_hand(root: Path, shard_ids: range, shard_size: int = 4) -> Path:
    """Native shard directories made with np.save, the way people write them (no journal, no rename)."""
    for shard_id in shard_ids:
        shard = root / f"shard_{shard_id:06d}"
        shard.mkdir(parents=True)
        for name, arr in sample_arrays(shard_size, shard_id * shard_size).items():
            np.save(shard / f"{name}.npy", arr)
    return root


def add_shards(root: Path, layout: str, first: int, count: int) -> None:
    if layout == "flat":
        for shard_id in range(first, first + count):
            for name, arr in sample_arrays(4, 4 * shard_id).items():
                np.save(root / f"{name}_{shard_id:06d}.npy", arr)
    elif layout == "by hand":
        write_by_hand(root, range(first, first + count))
    else:
        write_native(root, 4 * count, start_shard=first, journal=layout == "journal")


def make(tmp_path: Path, layout: str, num_shards: int) -> Path:
    root = tmp_path / "c"
    if layout == "flat":
        return write_flat(root, 4 * num_shards, 4)
    if layout == "by hand":
        return write_by_hand(root, range(num_shards))
    return write_native(root, 4 * num_shards, journal=layout == "journal")


def table_files(root: Path) -> dict[str, tuple[int, bytes]]:
    """The manifest's header and every column of every table: mtime and bytes."""
    files = [root / "manifest.json", *sorted((root / TABLE_DIR).rglob("*"))]
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else b"") for p in files}


LAYOUTS = ["native", "journal", "by hand", "flat"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_nothing_changed_reads_one_file_per_field_and_leaves_the_manifest_untouched(tmp_path: Path,
                                                                                   layout: str) -> None:
    root = make(tmp_path, layout, 6)
    first = build_manifest(root)
    assert first.headers_read == 6 * FIELDS and not first.unchanged
    before = table_files(root)
    again = build_manifest(root)
    assert again.unchanged and again.headers_read == FIELDS and again.files_reused == 6 * FIELDS
    assert again.paths_compared == 6 * FIELDS + (6 if layout != "flat" else 0)  # and each shard directory
    assert again.path == root / "manifest.json" and again.manifest == first.manifest
    assert table_files(root) == before, "an unchanged build rewrote the manifest"
    dry = build_manifest(root, write=False)
    assert dry.unchanged and dry.path is None


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("new", [1, 5])
def test_new_shards_are_the_only_ones_read(tmp_path: Path, layout: str, new: int) -> None:
    root = make(tmp_path, layout, 6)
    first = build_manifest(root).manifest
    add_shards(root, layout, 6, new)
    report = build_manifest(root)
    assert report.headers_read == new * FIELDS + FIELDS  # the new shards' files, and the spot check
    assert report.files_reused == 6 * FIELDS and not report.unchanged and report.problems == []
    m = report.manifest
    assert m.ids.tolist() == list(range(6 + new)) and m.generation == first.generation + 1
    assert m.columns["since"].tolist() == [0] * 6 + [1] * new
    assert load_manifest(root) == m
    full = build_manifest(root, incremental=False, write=False)
    assert full.headers_read == (6 + new) * FIELDS and full.manifest == m  # what a full build finds
    store = ShardStore.open(root)
    np.testing.assert_array_equal(store.sample(4 * (6 + new) - 1)["images"],
                                  sample_arrays(4 * (6 + new))["images"][-1])


def test_new_shards_among_many_cost_their_reads_only(tmp_path: Path) -> None:
    root = make(tmp_path, "journal", 40)
    build_manifest(root)
    add_shards(root, "journal", 40, 3)
    add_shards(root, "by hand", 50, 2)
    report = build_manifest(root)
    assert report.headers_read == 5 * FIELDS + FIELDS and report.manifest.num_shards == 45


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_touched_file_is_read_again_and_its_new_mtime_recorded(tmp_path: Path, layout: str) -> None:
    root = make(tmp_path, layout, 4)
    build_manifest(root)
    path = root / ("labels_000002.npy" if layout == "flat" else "shard_000002/labels.npy")
    os.utime(path, ns=(123_456_789, 123_456_789))
    report = build_manifest(root)
    # The whole shard is read again (its rows are re-derived), plus the spot check of shard 0.
    assert report.headers_read == FIELDS + FIELDS and not report.unchanged
    m = report.manifest
    assert m.columns["labels.mtime_ns"][2] == 123_456_789 and load_manifest(root) == m
    assert build_manifest(root).unchanged


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_rewritten_file_with_another_row_count_is_read_again(tmp_path: Path, layout: str) -> None:
    root = make(tmp_path, layout, 4)
    build_manifest(root)
    for name, arr in sample_arrays(3, 8).items():  # shard 2 rewritten in place with 3 rows
        np.save(root / (f"{name}_000002.npy" if layout == "flat" else f"shard_000002/{name}.npy"), arr)
    report = build_manifest(root)
    assert report.headers_read == 2 * FIELDS and report.manifest.counts.tolist() == [4, 4, 3, 4]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_deleted_shard_disappears_from_the_table(tmp_path: Path, layout: str) -> None:
    root = make(tmp_path, layout, 5)
    build_manifest(root)
    if layout == "flat":
        for path in root.glob("*_000003.npy"):
            path.unlink()
    else:
        shutil.rmtree(root / "shard_000003")
    report = build_manifest(root)
    assert report.headers_read == FIELDS and report.problems == []
    assert report.manifest.ids.tolist() == [0, 1, 2, 4] and load_manifest(root).ids.tolist() == [0, 1, 2, 4]
    assert ShardStore.open(root, check="all").num_samples == 16


def test_a_file_deleted_from_a_shard_leaves_it_out_with_its_reason(tmp_path: Path) -> None:
    root = make(tmp_path, "journal", 4)
    build_manifest(root)
    (root / "shard_000001" / "feats.npy").unlink()
    report = build_manifest(root)
    assert [str(p) for p in report.problems] == [
        "shard_000001/feats.npy: field 'feats' is missing (the other shards have it); the shard is left out"]
    assert report.manifest.ids.tolist() == [0, 2, 3]
    again = build_manifest(root)  # a left-out shard is read again at every build: it may have been fixed
    assert again.unchanged and again.headers_read == (FIELDS - 1) + FIELDS


@pytest.mark.parametrize("layout", ["journal", "by hand"])
def test_a_file_added_to_a_finished_shard_directory_is_seen(tmp_path: Path, layout: str) -> None:
    # The directory's mtime moves past its files' ctimes: the shard is listed and read again, as a full build would.
    root = make(tmp_path, layout, 3)
    build_manifest(root)
    for shard in sorted(root.glob("shard_*")):
        np.save(shard / "depth.npy", np.zeros((4, 2), np.float32))
    report = build_manifest(root)
    assert "depth" in report.manifest.fields and report.headers_read == 3 * (FIELDS + 1)
    assert report.manifest == build_manifest(root, incremental=False, write=False).manifest


def test_a_shard_directory_replaced_by_a_link_is_read_again(tmp_path: Path) -> None:
    root = make(tmp_path, "native", 3)
    build_manifest(root)
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "shard_000002").rename(outside / "shard_000002")
    (root / "shard_000002").symlink_to(outside / "shard_000002")
    report = build_manifest(root)
    assert report.manifest.ids.tolist() == [0, 1] and "outside the cache root" in str(report.problems[0])


GROUP = GroupSpec("teacher", {"teacher_top": (np.dtype(np.int64), ())})


def fill_group(root: Path, shard_ids: list[int], layout: str) -> None:
    for shard_id in shard_ids:
        rows = 4
        name = f"teacher_top_{shard_id:06d}.npy" if layout == "flat" else f"shard_{shard_id:06d}/teacher_top.npy"
        add_shard_fields({"teacher_top": root / name}, {"teacher_top": np.full(rows, shard_id, np.int64)}, fsync=False)


@pytest.mark.parametrize("layout", ["journal", "flat"])
def test_group_files_of_new_and_old_shards(tmp_path: Path, layout: str) -> None:
    root = make(tmp_path, layout, 4)
    write_group_spec(root, GROUP)
    fill_group(root, [0, 1], layout)
    first = build_manifest(root)
    assert first.manifest.positions_with(["teacher_top"]).tolist() == [0, 1]
    add_shards(root, layout, 4, 2)
    fill_group(root, [2, 4], layout)  # an old shard and a new one gain the group
    report = build_manifest(root)
    # Shard 2 (3 own files + its group file), the new shards 4 and 5 (shard 4 with the group file), and the spot
    # check: one file per field, the group's included (shard 0 has it).
    assert report.headers_read == (FIELDS + 1) + (2 * FIELDS + 1) + (FIELDS + 1)
    m = report.manifest
    assert m.positions_with(["teacher_top"]).tolist() == [0, 1, 2, 4] and m.fields["teacher_top"].group == "teacher"
    assert m.value_range(4, "teacher_top") == (4, 4) and m.columns["since"].tolist() == [0, 0, 0, 0, 1, 1]
    assert m == build_manifest(root, incremental=False, write=False).manifest
    assert build_manifest(root).unchanged


def test_a_group_declared_after_the_build_is_probed_in_every_shard_directory(tmp_path: Path) -> None:
    root = make(tmp_path, "native", 3)
    build_manifest(root)
    write_group_spec(root, GROUP)
    declared = build_manifest(root)  # no file yet: the manifest gains the group's (empty) columns
    assert declared.headers_read == FIELDS and "teacher_top" in declared.manifest.fields
    assert not declared.manifest.has("teacher_top").any()
    fill_group(root, [1], "native")
    report = build_manifest(root)
    assert report.headers_read == (FIELDS + 1) + FIELDS  # shard 1 read again; no kept shard has the group to check
    assert report.manifest.positions_with(["teacher_top"]).tolist() == [1]


# -- the writers' journal ---------------------------------------------------------------------------------


@pytest.fixture
def listed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The shard directories discovery lists (those the journal does not vouch for)."""
    names: list[str] = []
    inner = discover._native_files

    def spy(resolved_root: str, dir_path: str, dir_name: str):
        names.append(dir_name)
        return inner(resolved_root, dir_path, dir_name)

    monkeypatch.setattr(discover, "_native_files", spy)
    return names


def test_the_journal_saves_listing_the_directories_it_vouches_for(tmp_path: Path, listed: list[str]) -> None:
    root = write_native(tmp_path / "c", 12, journal=True)
    lines = (root / JOURNAL_NAME).read_text().splitlines()
    assert [line.split()[0] for line in lines] == ["shard_000000", "shard_000001", "shard_000002"]
    assert all(line.endswith(" images labels feats") for line in lines)
    report = build_manifest(root)
    assert listed == [] and report.headers_read == 3 * FIELDS
    np.save(root / "shard_000001" / "depth.npy", np.zeros(4))  # its mtime moves: no longer vouched for
    build_manifest(root, incremental=False, write=False)  # --full lists every directory
    assert listed == ["shard_000000", "shard_000001", "shard_000002"]
    listed.clear()
    (root / "manifest.json").unlink()
    report = build_manifest(root)
    assert listed == ["shard_000001"] and report.ignored_fields == {"depth": 1}


def test_a_torn_last_line_is_ignored_and_the_next_writer_starts_a_new_line(tmp_path: Path, listed: list[str]) -> None:
    root = write_native(tmp_path / "c", 12, journal=True)
    journal = root / JOURNAL_NAME
    text = journal.read_text()
    journal.write_text(text[: text.rindex("\n", 0, len(text) - 1) + 1] + "shard_000002 12")  # killed mid-line
    report = build_manifest(root)
    assert listed == ["shard_000002"] and report.manifest.num_shards == 3 and report.problems == []
    listed.clear()
    write_native(root, 8, start_shard=3, journal=True)  # shards 3 and 4, after the torn line
    lines = journal.read_text().split("\n")
    assert lines[2] == "shard_000002 12" and lines[3].startswith("shard_000003 ") and lines[-1] == ""
    (root / "manifest.json").unlink()
    report = build_manifest(root)
    assert listed == ["shard_000002"] and report.manifest.num_shards == 5


@pytest.mark.parametrize("line", [
    "shard_000001 1 2 images labels feats",  # another inode and mtime
    "shard_000001 x 2 images labels feats",  # not numbers
    "shard_000001 {ino} {mtime} images ../labels feats",  # not field names
    "shard_000001 {ino} {mtime} images images feats",  # a name twice
    "shard_000001 {ino} {mtime}",  # no file
])
def test_a_line_the_journal_cannot_vouch_for_means_a_listing(tmp_path: Path, listed: list[str], line: str) -> None:
    root = write_native(tmp_path / "c", 12, journal=True)
    st = os.stat(root / "shard_000001")
    with open(root / JOURNAL_NAME, "a") as f:
        f.write(line.format(ino=st.st_ino, mtime=st.st_mtime_ns) + "\n")
    report = build_manifest(root)
    assert listed == ["shard_000001"] and report.manifest.num_shards == 3 and report.problems == []


def test_a_journal_that_is_a_link_or_not_a_file_is_not_read(tmp_path: Path, listed: list[str]) -> None:
    root = write_native(tmp_path / "c", 8, journal=True)
    (root / JOURNAL_NAME).rename(tmp_path / "elsewhere")
    (root / JOURNAL_NAME).symlink_to(tmp_path / "elsewhere")
    assert build_manifest(root).manifest.num_shards == 2 and listed == ["shard_000000", "shard_000001"]
    with ShardWriter(root, 4, start_shard=2, fsync=False, journal=True) as w:  # the writer does not follow it
        w.add_batch(sample_arrays(4))
    assert (tmp_path / "elsewhere").read_text().count("\n") == 2


# -- trust and fallbacks -----------------------------------------------------------------------------------


def test_new_shards_that_change_the_majority_make_a_full_read(tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    root = make(tmp_path, "native", 2)
    build_manifest(root)
    for shard_id in range(2, 5):  # three new shards whose labels are int32: the majority now
        shard = root / f"shard_{shard_id:06d}"
        shard.mkdir()
        for name, arr in sample_arrays(4, 4 * shard_id).items():
            np.save(shard / f"{name}.npy", arr.astype(np.int32) if name == "labels" else arr)
    with caplog.at_level(logging.INFO, logger="shardstore.manifest.build"):
        report = build_manifest(root)
    assert "change the cache's fields" in caplog.text
    assert report.headers_read == 3 * FIELDS + FIELDS + 2 * FIELDS  # new shards, spot check, then the old ones
    assert report.manifest.fields["labels"].dtype == np.int32 and report.manifest.ids.tolist() == [2, 3, 4]
    assert [p.shard_id for p in report.problems] == [0, 1]
    assert report.manifest == build_manifest(root, incremental=False, write=False).manifest


def test_a_format2_manifest_lends_its_checksums_and_is_converted(tmp_path: Path) -> None:
    root = make(tmp_path, "native", 3)
    built = build_manifest(root, checksum=True).manifest
    (root / "manifest.json").write_text(built.to_json())
    assert load_manifest(root).format_version == 2
    report = build_manifest(root)
    assert report.headers_read == 3 * FIELDS and report.files_reused == 3 * FIELDS  # every header read once
    assert json.loads((root / "manifest.json").read_text())["version"] == 3
    assert load_manifest(root) == built and load_manifest(root).checksummed("images").all()
    assert build_manifest(root).unchanged


def test_checksums_of_kept_rows_are_added_without_reading_their_headers(tmp_path: Path) -> None:
    root = make(tmp_path, "native", 3)
    build_manifest(root)
    report = build_manifest(root, checksum=True)
    assert report.files_checksummed == 3 * FIELDS and report.headers_read == FIELDS and not report.unchanged
    assert all(load_manifest(root).checksummed(f).all() for f in report.manifest.fields)
    again = build_manifest(root, checksum=True)
    assert again.unchanged and again.files_checksummed == 0


def test_a_field_spec_in_the_table_that_no_shard_matches_is_caught(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    from shardstore.store.manifest import Manifest
    from shardstore.store.snapshot import write_manifest

    root = make(tmp_path, "native", 3)
    honest = build_manifest(root).manifest
    m = load_manifest(root)
    write_manifest(root, Manifest({**m.fields, "feats": FieldSpec(np.dtype(np.int16), (3,))},
                                  columns={k: np.array(v) for k, v in m.columns.items()}, generation=m.generation))
    report = build_manifest(root)
    assert "every header is read again" in caplog.text and load_manifest(root) == honest
    assert report.headers_read == 1 + 3 * FIELDS  # the spot check stops at feats (the first field), then all
