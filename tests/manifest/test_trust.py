"""What a rebuild may take from an old manifest, and what no reader may follow: changed files, tampering, symlinks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shardstore import ManifestError, ShardStore, build_manifest, verify_checksums
from shardstore.cli import main
from shardstore.manifest.checksum import file_checksum
from shardstore.store.manifest import FieldSpec, FileEntry, Manifest, ShardEntry
from shardstore.store.reader import load_manifest
from shardstore.store.snapshot import write_manifest
from tests.conftest import sample_arrays

SECRET = b"SECRET-CONTENT-OUTSIDE-THE-ROOT\n"


def run(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def edit_manifest(root: Path, edit) -> None:
    """Replace the manifest with ``edit`` applied to it as a format-2 document (all JSON, a dict per shard)."""
    doc = json.loads(load_manifest(root).to_json())
    edit(doc)
    (root / "manifest.json").write_text(json.dumps(doc))


def edit_table(root: Path, edit, fields: dict | None = None) -> None:
    """Write a format-3 snapshot whose columns are the current ones with ``edit`` applied (and ``fields``)."""
    m = load_manifest(root)
    columns = {name: np.array(col) for name, col in m.columns.items()}
    edit(columns)
    write_manifest(root, Manifest({**m.fields, **(fields or {})}, columns=columns, left_out=m.left_out,
                                  generation=m.generation))


def flip_in_place(path: Path) -> None:
    """A same-size change of the data (bit rot, a stray write), as the attack run made it."""
    with open(path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))


# -- item 2: a routine rebuild never launders a changed file ------------------------------------


def test_changed_content_keeps_its_checksum_and_verify_fails(native_cache: Path, capsys: pytest.CaptureFixture) -> None:
    build_manifest(native_cache, checksum=True)
    recorded = ShardStore.open(native_cache).manifest.shards[1].files["labels"].checksum
    path = native_cache / "shard_000001" / "labels.npy"
    flip_in_place(path)
    report = build_manifest(native_cache)  # what `write` and `cache-teacher` run
    assert report.manifest.shards[1].files["labels"].checksum == recorded
    assert [str(p) for p in report.changed] == [
        "shard_000001/labels.npy: content changed since its checksum was recorded (manifest "
        f"{recorded[:23]}..., file {file_checksum(path)[:23]}...); the recorded checksum is kept so `shardstore "
        f"verify` fails until you restore the file, or accept its new content with `shardstore build-manifest "
        f"--full --checksum {native_cache}`"
    ]
    for _ in range(2):  # and the next rebuild does not launder it either
        build_manifest(native_cache)
        bad = verify_checksums(native_cache, ShardStore.open(native_cache).manifest).mismatches
        assert [p.path for p in bad] == ["shard_000001/labels.npy"] and "checksum mismatch" in bad[0].reason
    code, out = run(["verify", str(native_cache)], capsys)
    assert code == 1 and "mismatch: shard_000001/labels.npy: checksum mismatch" in out and "1 bad" in out


def test_touched_but_unchanged_file_keeps_its_checksum(native_cache: Path) -> None:
    build_manifest(native_cache, checksum=True)
    before = ShardStore.open(native_cache).manifest.shards[0].files["images"].checksum
    os.utime(native_cache / "shard_000000" / "images.npy", ns=(7, 7))
    report = build_manifest(native_cache)
    entry = report.manifest.shards[0].files["images"]
    assert entry.checksum == before and entry.mtime_ns == 7 and report.changed == []
    assert verify_checksums(native_cache, report.manifest).ok


def test_changed_size_with_recorded_checksum_is_reported(native_cache: Path) -> None:
    build_manifest(native_cache, checksum=True)
    arrays = sample_arrays(5)
    for name, arr in arrays.items():  # the whole shard rewritten with another row count
        np.save(native_cache / "shard_000002" / f"{name}.npy", arr)
    report = build_manifest(native_cache)
    assert not verify_checksums(native_cache, report.manifest).ok
    assert sorted(p.path for p in report.changed) == [f"shard_000002/{n}.npy" for n in sorted(arrays)]
    assert all("changed size since its checksum was recorded" in p.reason for p in report.changed)


def test_restoring_or_accepting_a_change_clears_it(native_cache: Path) -> None:
    build_manifest(native_cache, checksum=True)
    path = native_cache / "shard_000001" / "labels.npy"
    original = path.read_bytes()
    flip_in_place(path)
    assert not verify_checksums(native_cache, build_manifest(native_cache).manifest).ok
    path.write_bytes(original)  # restored: same content, new mtime
    restored = build_manifest(native_cache)
    assert verify_checksums(native_cache, restored.manifest).ok and restored.changed == []
    flip_in_place(path)
    accepted = build_manifest(native_cache, incremental=False, checksum=True)  # the fix the line names
    assert verify_checksums(native_cache, accepted.manifest).ok and accepted.changed == []
    assert accepted.manifest.shards[1].files["labels"].checksum == file_checksum(path)


# -- item 3: values of an old manifest are re-derived from the files, or checked against them -------------


def test_a_tampered_format2_manifest_is_converted_from_the_files(native_cache: Path) -> None:
    # A format 1/2 manifest only lends sizes, mtimes and checksums: its conversion reads every header.
    honest = build_manifest(native_cache).manifest
    edit_manifest(native_cache, lambda d: d["fields"].update(labels={"dtype": "<u8", "shape": []}))
    edit_manifest(native_cache, lambda d: d["shards"][2]["files"]["images"].update(data_offset=104, bytes=152))
    edit_manifest(native_cache, lambda d: d["fields"]["images"].update(shape=[4, 3, 2]))
    report = build_manifest(native_cache)
    assert report.headers_read == 9 and report.files_reused == 8  # shard 2's images "changed size" (152 bytes)
    assert json.loads((native_cache / "manifest.json").read_text())["version"] == 3
    assert load_manifest(native_cache) == report.manifest == honest
    store = ShardStore.open(native_cache)
    np.testing.assert_array_equal(store.sample(9)["labels"], sample_arrays(10)["labels"][9])


@pytest.mark.parametrize("field", ["labels", "images"])
def test_a_field_edited_in_the_table_is_caught_by_the_spot_check(native_cache: Path, field: str,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    # Same item size (uint64 for int64, [4, 3, 2] for [2, 3, 4]): every offset and size still adds up.
    honest = build_manifest(native_cache).manifest
    edited = {"labels": FieldSpec(np.dtype("<u8"), ()), "images": FieldSpec(np.dtype(np.uint8), (4, 3, 2))}[field]
    edit_table(native_cache, lambda c: None, {field: edited})
    assert load_manifest(native_cache).fields[field] == edited
    report = build_manifest(native_cache)
    assert "the manifest's table says" in caplog.text and "every header is read again" in caplog.text
    # The spot check (one file per field, in field order, up to the edited one), then every file.
    assert report.headers_read == sorted(honest.fields).index(field) + 1 + 9
    assert load_manifest(native_cache) == honest


def test_a_consistently_tampered_row_of_unchanged_files_is_trusted_until_a_full_rebuild(native_cache: Path) -> None:
    # Shard 2 (2 rows) told as 3 rows behind smaller headers: every file's size still adds up, ids are in order,
    # and the spot check reads shard 0. An incremental build trusts such a table for files it finds unchanged.
    honest = build_manifest(native_cache).manifest

    def three_rows(c: dict) -> None:
        c["samples"][2] = 3
        for name, sample_bytes in (("images", 24), ("labels", 8), ("feats", 6)):
            c[f"{name}.offset"][2] -= sample_bytes

    edit_table(native_cache, three_rows)
    trusted = build_manifest(native_cache)
    assert trusted.unchanged and trusted.headers_read == 3 and trusted.manifest.num_samples == 11
    full = build_manifest(native_cache, incremental=False)
    assert full.headers_read == 9 and load_manifest(native_cache) == full.manifest == honest
    assert ShardStore.open(native_cache).num_samples == 10


@pytest.mark.parametrize("fmt", [2, 3])
def test_tampered_offset_and_rows_are_refused_and_a_rebuild_fixes_them(native_cache: Path, fmt: int,
                                                                       capsys: pytest.CaptureFixture,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    build_manifest(native_cache, checksum=True)
    if fmt == 2:
        edit_manifest(native_cache, lambda d: d["shards"][0]["files"]["labels"].update(data_offset=0))
        said = "shard_000000/labels.npy: data_offset 0 + 4 rows of 8 bytes do not make its 160 bytes"
    else:  # offset 0 means "no such file": a field every shard must have
        edit_table(native_cache, lambda c: c["labels.offset"].__setitem__(0, 0))
        said = "shard 0 lacks field 'labels', which every shard must have"
    code, out = run(["verify", str(native_cache)], capsys)
    assert code == 2 and out.count("\n") == 1 and said in out
    assert f"rebuild it with `shardstore build-manifest {native_cache}`" in out
    rebuilt = build_manifest(native_cache)  # what the message says; the recorded checksums survive the edit
    # Format 3: the row no longer records the file's size, so the file is hashed and compared with its checksum.
    assert rebuilt.headers_read == 9 and rebuilt.files_reused == (9 if fmt == 2 else 8) and rebuilt.changed == []
    if fmt == 3:  # the table fails its full check: not trusted, every header read
        assert "fails its check" in caplog.text and "every header is read again" in caplog.text
    assert all(f.checksum for s in rebuilt.manifest.shards for f in s.files.values())
    assert run(["verify", str(native_cache)], capsys)[0] == 0
    np.testing.assert_array_equal(ShardStore.open(native_cache).sample(1)["labels"], sample_arrays(10)["labels"][1])


def test_verify_checks_headers_against_the_manifest(native_cache: Path) -> None:
    build_manifest(native_cache, checksum=True)
    m = load_manifest(native_cache).with_fields({"labels": load_manifest(native_cache).fields["labels"]})
    columns = {name: np.array(col) for name, col in m.columns.items()}
    # labels as 18 rows from offset 16: adds up to the file's 160 bytes, and its checksum is the file's, yet it
    # reads the header as data
    columns["samples"][0] = 18
    columns["labels.offset"][0] = 16
    report = verify_checksums(native_cache, Manifest(m.fields, columns=columns))
    assert [p.path for p in report.mismatches] == ["shard_000000/labels.npy"]
    assert "file holds int64[4] at offset 128 in 160 bytes, the manifest says int64[18] at offset 16 in 160" in str(
        report.mismatches[0])


TAMPERED_ROWS = {
    "num_samples": (lambda d: d["shards"][1].update(num_samples=-5), lambda c: c["samples"].__setitem__(1, -5)),
    "duplicate": (lambda d: d["shards"].insert(1, d["shards"][0]), lambda c: c["id"].__setitem__(1, 0)),
    "out_of_order": (lambda d: d["shards"].reverse(), lambda c: c["id"].__setitem__(slice(None), [2, 1, 0])),
}


@pytest.mark.parametrize("fmt", [2, 3])
@pytest.mark.parametrize("what", sorted(TAMPERED_ROWS))
def test_rows_and_duplicates_from_an_old_manifest_are_never_reused(native_cache: Path, what: str, fmt: int,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    build_manifest(native_cache, checksum=True)
    json_edit, table_edit = TAMPERED_ROWS[what]
    if fmt == 2:
        edit_manifest(native_cache, json_edit)
    else:
        edit_table(native_cache, table_edit)
    with pytest.raises(ManifestError, match=r"rebuild it with `shardstore build-manifest"):
        ShardStore.open(native_cache)
    report = build_manifest(native_cache)
    assert "ignoring the existing manifest" in caplog.text and report.headers_read == 9
    assert [(s.id, s.num_samples) for s in report.manifest.shards] == [(0, 4), (1, 4), (2, 2)]
    assert ShardStore.open(native_cache).num_samples == 10
    # Well-formed entries lend their checksums (the refused manifest is read for nothing else); a negative row count
    # gives no size to compare a format-3 row's files with.
    lent = [s.id for s in report.manifest.shards if all(f.checksum for f in s.files.values())]
    # A refused table lends only to files that still have its row's size and mtime (its ids may be what is wrong).
    want = {("num_samples", 3): [0, 2], ("duplicate", 3): [0, 2], ("out_of_order", 3): [1]}.get((what, fmt), [0, 1, 2])
    assert lent == want and report.changed == []


# -- item 13: temporaries of killed manifest writers ---------------------------------------------


def test_stale_manifest_temporaries_are_removed_live_ones_kept(native_cache: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = native_cache / f".manifest.json.tmp-{dead_pid}-0a1b2c3d"
    live = native_cache / f".manifest.json.tmp-{os.getpid()}-0a1b2c3d"
    other = native_cache / f".notes.json.tmp-{dead_pid}-0a1b2c3d"
    for p in (stale, live, other):
        p.write_bytes(b"{partial")
    build_manifest(native_cache, write=False)  # a dry run changes nothing
    assert stale.exists()
    build_manifest(native_cache)
    assert not stale.exists() and live.exists() and other.exists()


# -- items 18, 19: nothing is followed, read or printed outside the root -------------------------


def test_symlinked_file_outside_root_is_never_read_or_printed(native_cache: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_bytes(SECRET * 4)
    (native_cache / "images_000009.npy").symlink_to(secret)  # a flat file
    (native_cache / "shard_000001" / "labels.npy").unlink()
    (native_cache / "shard_000001" / "labels.npy").symlink_to(secret)  # a file of a native shard
    code, out = run(["build-manifest", str(native_cache)], capsys)
    assert code == 0 and b"SECRET" not in out.encode()
    assert f"left out: images_000009.npy: images_000009.npy resolves to {secret}, outside the cache root; " in out
    assert "shard_000001/labels.npy resolves to" in out
    assert "replace the symlink with the file itself, or move what it points to inside the cache root" in out


def test_verify_and_build_do_not_follow_a_symlink_out_of_the_root(native_cache: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    build_manifest(native_cache, checksum=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (native_cache / "shard_000002").rename(outside / "shard_000002")
    (native_cache / "shard_000002").symlink_to(outside / "shard_000002")
    code, out = run(["verify", str(native_cache)], capsys)
    assert code == 1 and "0 bad" not in out
    assert out.count("outside the cache root (not read)") == 3
    report = build_manifest(native_cache, checksum=True)
    assert [s.id for s in report.manifest.shards] == [0, 1]
    assert str(report.problems[0]).startswith(f"shard_000002: shard_000002 resolves to {outside / 'shard_000002'}")


def test_symlinks_inside_the_root_stay_allowed(native_cache: Path) -> None:
    (native_cache / "store").mkdir()
    (native_cache / "shard_000002").rename(native_cache / "store" / "s2")
    (native_cache / "shard_000002").symlink_to(native_cache / "store" / "s2")
    report = build_manifest(native_cache, checksum=True)
    assert report.problems == [] and len(report.manifest.shards) == 3
    assert verify_checksums(native_cache, report.manifest).ok
    assert ShardStore.open(native_cache).sample(9)["labels"] == sample_arrays(10)["labels"][9]


# -- item 21: the parser's `..` check, and verify on its own --------------------------------------


@pytest.mark.parametrize("bad_path", ["../outside.npy", "shard_000000/../../outside.npy", "/etc/passwd"])
def test_parser_itself_rejects_paths_out_of_the_root(native_cache: Path, bad_path: str) -> None:
    # Format 3 records no paths (each is derived from the id, its width and the layout); format 2 named them.
    build_manifest(native_cache)
    doc = json.loads(load_manifest(native_cache).to_json())
    doc["shards"][0]["files"]["labels"]["path"] = bad_path
    with pytest.raises(ManifestError, match=r"points outside the cache root; a manifest lists relative paths only"):
        Manifest.from_json(json.dumps(doc))


def test_verify_never_reads_a_path_out_of_the_root(native_cache: Path, tmp_path: Path) -> None:
    m = build_manifest(native_cache, checksum=True).manifest
    inside = native_cache / "shard_000000" / "labels.npy"
    outside = tmp_path / "outside.npy"
    outside.write_bytes(inside.read_bytes())  # same bytes, same checksum: reading it would pass
    inside.unlink()
    inside.symlink_to(outside)
    report = verify_checksums(native_cache, m)
    assert [p.path for p in report.mismatches] == ["shard_000000/labels.npy"]
    assert "outside the cache root (not read)" in report.mismatches[0].reason
    # A manifest made in Python cannot name a path either: the entry's path is derived, never taken.
    s = m.shards[0]
    escaped = FileEntry("../outside.npy", s.files["labels"].bytes, 0, s.files["labels"].data_offset)
    made = Manifest(m.fields, [ShardEntry(0, 4, "native", {**s.files, "labels": escaped})])
    assert made.shards[0].files["labels"].path == "shard_000000/labels.npy"
