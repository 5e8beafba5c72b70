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
from shardstore.manifest.model import FileEntry, Manifest, ShardEntry
from tests.conftest import sample_arrays

SECRET = b"SECRET-CONTENT-OUTSIDE-THE-ROOT\n"


def run(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def edit_manifest(root: Path, edit) -> None:
    doc = json.loads((root / "manifest.json").read_text())
    edit(doc)
    (root / "manifest.json").write_text(json.dumps(doc))


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


# -- item 3: values of an old manifest are re-derived from the files ------------------------------


def test_rebuild_from_a_consistently_tampered_manifest_is_correct(native_cache: Path) -> None:
    build_manifest(native_cache)
    honest = json.loads((native_cache / "manifest.json").read_text())
    edit_manifest(native_cache, lambda d: d["fields"].update(labels={"dtype": "<u8", "shape": []}))
    edit_manifest(native_cache, lambda d: d["shards"][2]["files"]["images"].update(data_offset=104, bytes=152))
    edit_manifest(native_cache, lambda d: d["fields"]["images"].update(shape=[4, 3, 2]))
    report = build_manifest(native_cache)
    assert json.loads((native_cache / "manifest.json").read_text())["fields"] == honest["fields"]
    assert report.manifest.to_json() == Manifest.from_json(json.dumps(honest)).to_json()
    store = ShardStore.open(native_cache)
    np.testing.assert_array_equal(store.sample(9)["labels"], sample_arrays(10)["labels"][9])


def test_tampered_offset_and_rows_are_refused_and_a_rebuild_fixes_them(native_cache: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    build_manifest(native_cache, checksum=True)
    edit_manifest(native_cache, lambda d: d["shards"][0]["files"]["labels"].update(data_offset=0))
    code, out = run(["verify", str(native_cache)], capsys)
    assert code == 2 and out.count("\n") == 1
    assert "shard_000000/labels.npy: data_offset 0 + 4 rows of 8 bytes do not make its 160 bytes" in out
    assert f"rebuild it with `shardstore build-manifest {native_cache}`" in out
    rebuilt = build_manifest(native_cache)  # what the message says; the recorded checksums survive the edit
    assert all(f.checksum for s in rebuilt.manifest.shards for f in s.files.values())
    assert run(["verify", str(native_cache)], capsys)[0] == 0
    np.testing.assert_array_equal(ShardStore.open(native_cache).sample(1)["labels"], sample_arrays(10)["labels"][1])


def test_verify_checks_headers_against_the_manifest(native_cache: Path) -> None:
    build_manifest(native_cache, checksum=True)
    m = ShardStore.open(native_cache).manifest
    s = m.shards[0]
    f = s.files["labels"]
    # labels as 20 rows from offset 0: adds up, and its checksum is the file's, yet it reads the header as data
    lying = ShardEntry(s.id, 20, s.layout, {"labels": FileEntry(f.path, f.bytes, f.mtime_ns, 0, f.checksum)})
    report = verify_checksums(native_cache, Manifest({"labels": m.fields["labels"]}, [lying]))
    assert [p.path for p in report.mismatches] == ["shard_000000/labels.npy"]
    assert "file holds int64[4] at offset 128 in 160 bytes, the manifest says int64[20] at offset 0" in str(
        report.mismatches[0])


@pytest.mark.parametrize("what", ["num_samples", "duplicate", "out_of_order"])
def test_rows_and_duplicates_from_an_old_manifest_are_never_reused(native_cache: Path, what: str) -> None:
    build_manifest(native_cache)
    edits = {
        "num_samples": lambda d: d["shards"][1].update(num_samples=-5),
        "duplicate": lambda d: d["shards"].insert(1, d["shards"][0]),
        "out_of_order": lambda d: d["shards"].reverse(),
    }
    edit_manifest(native_cache, edits[what])
    with pytest.raises(ManifestError, match=r"rebuild it with `shardstore build-manifest"):
        ShardStore.open(native_cache)
    report = build_manifest(native_cache)
    assert [(s.id, s.num_samples) for s in report.manifest.shards] == [(0, 4), (1, 4), (2, 2)]
    assert ShardStore.open(native_cache).num_samples == 10


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
    build_manifest(native_cache)
    doc = json.loads((native_cache / "manifest.json").read_text())
    doc["shards"][0]["files"]["labels"]["path"] = bad_path
    with pytest.raises(ManifestError, match=r"points outside the cache root; a manifest lists relative paths only"):
        Manifest.from_json(json.dumps(doc))


def test_verify_never_reads_a_path_out_of_the_root(native_cache: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.npy"
    np.save(outside, np.arange(4, dtype=np.int64))
    m = build_manifest(native_cache).manifest
    s = m.shards[0]
    f = s.files["labels"]
    # A manifest made in Python skips the parser; its checksum is the outside file's own, so reading it would pass.
    escaped = FileEntry("../outside.npy", outside.stat().st_size, f.mtime_ns, f.data_offset, file_checksum(outside))
    report = verify_checksums(native_cache, Manifest(m.fields, [ShardEntry(0, 4, "native", {**s.files,
                                                                                          "labels": escaped})]))
    assert [p.path for p in report.mismatches] == ["../outside.npy"]
    assert "outside the cache root (not read)" in report.mismatches[0].reason
