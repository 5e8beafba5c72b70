"""Manifest format 3: a JSON header (manifest.json) naming a columnar table (manifest.d/<snapshot>/, one .npy a column).

What it promises: a round trip keeps every column and entry; a build killed at any moment
leaves the old snapshot or the new one, never a header of one and a table of the other;
formats 1 and 2 still open; a shard damaged after the build is named where it is used; a
hostile table is one line naming the file and the fix (exit 2), never a crash, never a
file read from outside the root, never a pickle loaded; the snapshot GC deletes only
what it wrote.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from shardstore import CorruptShardError, ManifestError, ShardStore, ShardstoreError, ShardWriter, build_manifest
from shardstore.cli import main
from shardstore.store.manifest import Manifest
from shardstore.store.reader import load_manifest
from tests.conftest import sample_arrays, write_flat, write_native
from tests.manifest.synthetic import (
    column,
    header,
    replace_column,
    table_dir,
    table_dirs,
    write_header,
)

REPO = Path(__file__).resolve().parents[2]


def summary_format(capsys: pytest.CaptureFixture, root: Path) -> str:
    """The ``format`` row of ``shardstore info ROOT``."""
    code = main(["info", str(root)])
    out = capsys.readouterr().out
    assert code == 0, out
    found = re.search(r"│ format\s*│ (.*?)\s*│", out)
    assert found, out
    return found.group(1)


def one_line_exit_2(capsys: pytest.CaptureFixture, *argv: str) -> str:
    """Run the CLI; it must end with exit 2 and one line on stderr. Returns the line."""
    code = main(list(argv))
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured.err + captured.out
    assert len(lines) == 1 and lines[0].startswith("shardstore: error: "), captured.err
    assert "Traceback" not in captured.err + captured.out
    return lines[0]


# -- round trip --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["native", "flat"])
def test_round_trip_keeps_every_column_and_entry(tmp_path: Path, layout: str, capsys: pytest.CaptureFixture) -> None:
    root = write_native(tmp_path / "c", 10, 4) if layout == "native" else write_flat(tmp_path / "c", 10, 4, digits=3)
    built = build_manifest(root, checksum=True).manifest
    doc = header(root)
    assert doc["version"] == 3 and doc["num_shards"] == 3 and doc["num_samples"] == 10
    assert doc["table"] == f"manifest.d/{table_dir(root).name}" and table_dir(root).is_dir()

    read = load_manifest(root, check="all")
    assert read.format_version == 3 and read.snapshot_id == built.snapshot_id == doc["snapshot_id"]
    assert read.columns.keys() == built.columns.keys()
    for name, col in built.columns.items():
        assert read.columns[name].dtype == col.dtype and read.columns[name].shape == col.shape, name
        np.testing.assert_array_equal(read.columns[name], col, err_msg=name)
        assert not read.columns[name].flags.writeable, f"{name} should be a read-only map of the table"
    assert read == built and list(read.shards) == list(built.shards)
    assert read.fields == built.fields and read.num_samples == 10 and read.total_bytes == built.total_bytes

    # The entries say what the files are: their size, data offset, checksum and label range.
    labels = sample_arrays(10)["labels"]
    for position, shard in enumerate(read.shards):
        assert shard.layout == layout and shard.num_samples == [4, 4, 2][position]
        for name, entry in shard.files.items():
            path = root / entry.path
            assert entry.path == (f"shard_{shard.id:06d}/{name}.npy" if layout == "native"
                                  else f"{name}_{shard.id:03d}.npy")
            assert entry.bytes == path.stat().st_size and entry.mtime_ns == path.stat().st_mtime_ns
            assert entry.data_offset == np.load(path, mmap_mode="r").offset
            assert entry.checksum == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
        rows = labels[4 * position: 4 * position + shard.num_samples]
        assert shard.files["labels"].value_range == (int(rows.min()), int(rows.max()))
        assert shard.files["images"].value_range is None

    # The same manifest as a format-2 document says the same about every shard.
    again = Manifest.from_json(read.to_json())
    assert again.format_version == 2 and list(again.shards) == list(read.shards)
    store = ShardStore.open(root)
    for i in (0, 5, 9):
        np.testing.assert_array_equal(store.sample(i)["images"], sample_arrays(10)["images"][i])
    shown = summary_format(capsys, root)
    assert shown.startswith("3 (JSON header + columnar table in manifest.d/") and table_dir(root).name in shown


def test_a_rebuild_counts_generations_and_keeps_each_shards_since(native_cache: Path) -> None:
    first = build_manifest(native_cache).manifest
    assert first.generation == 0 and column(native_cache, "since").tolist() == [0, 0, 0]
    with ShardWriter(native_cache, 4, start_shard=3, fsync=False) as w:
        w.add_batch(sample_arrays(4, start=10))
    second = build_manifest(native_cache).manifest
    assert second.generation == 1 and header(native_cache)["generation"] == 1
    assert column(native_cache, "since").tolist() == [0, 0, 0, 1]
    assert load_manifest(native_cache).generation == 1
    assert second.snapshot_id != first.snapshot_id


# -- a build killed at random moments -----------------------------------------------------------------------------

KILL_SEED = 31
KILLS = 30
PAUSE_S = 0.02

# The child widens the gaps between the steps of writing a snapshot (each column, the table's rename,
# the header), so that kills land in every step; what it writes and in which order is unchanged.
BUILD_CHILD = r"""
import sys, time
import shardstore.store.snapshot as snapshot
from shardstore import build_manifest

pause = float(sys.argv[2])
write_column, write_header = snapshot._write_column, snapshot.write_bytes_atomic

def slow_column(path, array):
    time.sleep(pause)
    write_column(path, array)

def slow_header(path, data):
    time.sleep(pause)
    write_header(path, data)
    time.sleep(pause)

snapshot._write_column = slow_column
snapshot.write_bytes_atomic = slow_header
print("ready", flush=True)
build_manifest(sys.argv[1])
"""


def start_build(root: Path) -> tuple[subprocess.Popen, float]:
    """A build of ``root`` in a child process, once it has imported everything; returns it and when it was ready."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", BUILD_CHILD, str(root), str(PAUSE_S)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=env, cwd=REPO)
    assert child.stdout.readline() == b"ready\n", child.stderr.read().decode()
    return child, time.monotonic()


def shard_ids_on_disk(root: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in root.glob("shard_*"))


def temporary_tables(root: Path) -> dict[str, int]:
    """``manifest.d`` temporaries by name, with the pid that wrote each."""
    found = {}
    for name in os.listdir(root / "manifest.d"):
        m = re.match(r"^\..*\.tmp-(\d+)$", name)
        if m:
            found[name] = int(m.group(1))
    return found


@pytest.mark.slow
def test_a_build_killed_at_random_moments_leaves_the_old_or_the_new_snapshot(tmp_path: Path) -> None:
    root = write_native(tmp_path / "cache", 40, 4)  # shards 0..9
    build_manifest(root)
    opened = ShardStore.open(root).shard_ids.tolist()
    next_id = 10

    def add_shard() -> None:
        nonlocal next_id
        with ShardWriter(root, 4, start_shard=next_id, fsync=False) as w:
            w.add_batch(sample_arrays(4, start=4 * next_id))
        next_id += 1

    add_shard()
    child, ready = start_build(root)  # one uninterrupted build: how long the work after start-up takes
    _, err = child.communicate(timeout=60)
    assert child.returncode == 0, err.decode()
    window_s = time.monotonic() - ready
    opened = ShardStore.open(root).shard_ids.tolist()
    assert opened == shard_ids_on_disk(root)

    rng = np.random.default_rng(KILL_SEED)
    kills = finished = attempts = 0
    killed_pids: set[int] = set()
    temporaries_seen = orphans_seen = 0
    while kills < KILLS and attempts < 3 * KILLS:
        attempts += 1
        add_shard()  # the cache changes between builds: the new snapshot differs from the old
        before, after = opened, shard_ids_on_disk(root)
        tables_before = set(table_dirs(root))
        child, ready = start_build(root)
        time.sleep(max(0.0, ready + rng.uniform(0.0, 1.1 * window_s) - time.monotonic()))
        child.send_signal(signal.SIGKILL)
        _, err = child.communicate(timeout=60)
        code = child.returncode
        if code == 0:
            finished += 1
        else:
            assert code == -signal.SIGKILL, err.decode()
            kills += 1
            killed_pids.add(child.pid)

        store = ShardStore.open(root, check="all")  # the header, its whole table, and every file it lists
        opened = store.shard_ids.tolist()
        assert opened in (before, after), f"attempt {attempts}: a snapshot of neither the old nor the new cache"
        if code == 0:
            assert opened == after
        np.testing.assert_array_equal(store.sample(store.num_samples - 1)["labels"],
                                      sample_arrays(1, start=4 * opened[-1] + 3)["labels"][0])
        temporaries = temporary_tables(root)
        if code == 0:  # a build that ran to its end removed what killed builds left, and tables older than two
            assert not set(temporaries.values()) & killed_pids, temporaries
            assert len(table_dirs(root)) <= 2, table_dirs(root)
        temporaries_seen += child.pid in temporaries.values()
        orphans_seen += len(set(table_dirs(root)) - tables_before - {table_dir(root).name})

    assert kills >= KILLS, f"only {kills} kills landed in {attempts} builds"
    assert temporaries_seen >= 1, "no kill landed while a table was being written"
    build_manifest(root)  # a later build cleans up after every killed one
    assert temporary_tables(root) == {} and not list(root.glob(".manifest.json.tmp-*"))
    assert len(table_dirs(root)) <= 2
    assert ShardStore.open(root, check="all").shard_ids.tolist() == shard_ids_on_disk(root)
    print(f"\nformat 3 kill test: {kills} SIGKILLs in {attempts} builds ({finished} finished first), "
          f"{temporaries_seen} left a temporary table, {orphans_seen} an unnamed complete table; "
          f"a build's work took {window_s:.2f} s")


# -- formats 1 and 2 ----------------------------------------------------------------------------------------------


def version_1_document(root: Path) -> dict:
    """A version-1 manifest written by hand from the shard files (as the first shardstore wrote it)."""
    fields, shards = {}, []
    for shard_dir in sorted(root.glob("shard_*")):
        files = {}
        for path in sorted(shard_dir.glob("*.npy")):
            arr = np.load(path, mmap_mode="r")
            fields[path.stem] = {"dtype": arr.dtype.str, "shape": list(arr.shape[1:])}
            st = path.stat()
            files[path.stem] = {"path": f"{shard_dir.name}/{path.name}", "bytes": st.st_size,
                                "mtime_ns": st.st_mtime_ns, "data_offset": int(arr.offset)}
            num_samples = int(arr.shape[0])
        shards.append({"id": int(shard_dir.name.split("_")[1]), "num_samples": num_samples, "layout": "native",
                       "files": files})
    return {"format": "shardstore-manifest", "version": 1, "fields": fields, "shards": shards, "left_out": []}


def test_formats_1_and_2_still_open_and_info_says_which(native_cache: Path, capsys: pytest.CaptureFixture) -> None:
    built = build_manifest(native_cache, checksum=True).manifest
    manifest_json = native_cache / "manifest.json"
    manifest_json.write_text(built.to_json())
    store = ShardStore.open(native_cache, check="all")
    assert store.manifest.format_version == 2 and list(store.shards) == list(built.shards)
    np.testing.assert_array_equal(store.sample(9)["images"], sample_arrays(10)["images"][9])
    assert summary_format(capsys, native_cache).startswith("2 (all JSON")

    # A format-2 manifest is read from its JSON, whatever table a later build left in manifest.d/.
    doc = json.loads(built.to_json())
    doc["shards"] = doc["shards"][:2]
    manifest_json.write_text(json.dumps(doc))
    assert ShardStore.open(native_cache).shard_ids.tolist() == [0, 1]

    manifest_json.write_text(json.dumps(version_1_document(native_cache)))
    old = ShardStore.open(native_cache, check="all")
    assert old.manifest.format_version == 1 and old.shard_ids.tolist() == [0, 1, 2] and old.num_samples == 10
    assert [s.files["labels"].path for s in old.shards] == [f"shard_00000{i}/labels.npy" for i in range(3)]
    np.testing.assert_array_equal(old.sample(5)["feats"], sample_arrays(10)["feats"][5])
    assert summary_format(capsys, native_cache).startswith("1 (all JSON")

    build_manifest(native_cache)  # the next build converts it
    assert header(native_cache)["version"] == 3
    assert summary_format(capsys, native_cache).startswith("3 (JSON header")
    converted = ShardStore.open(native_cache, check="all")
    assert [(s.id, s.num_samples) for s in converted.shards] == [(0, 4), (1, 4), (2, 2)]
    assert converted.manifest.format_version == 3


# -- a shard damaged after the build ------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_a_damaged_shard_is_named_at_first_use_by_verify_and_by_check_all(native_cache: Path, damage: str,
                                                                        capsys: pytest.CaptureFixture) -> None:
    build_manifest(native_cache, checksum=True)
    path = native_cache / "shard_000001" / "images.npy"
    if damage == "deleted":
        path.unlink()
    else:
        os.truncate(path, 100)
    store = ShardStore.open(native_cache)  # opening reads the manifest only
    np.testing.assert_array_equal(store.field(0, "images"), sample_arrays(4)["images"])
    with pytest.raises(CorruptShardError, match=re.escape(str(path))) as info:
        store.field(1, "images")
    assert "\n" not in str(info.value) and "build-manifest" in str(info.value)
    with pytest.raises(ManifestError, match=re.escape(str(path))):
        ShardStore.open(native_cache, check="all")
    code = main(["verify", str(native_cache)])
    captured = capsys.readouterr()
    assert code == 1 and "1 bad" in captured.out
    assert [line for line in captured.err.splitlines() if "shard_000001/images.npy" in line]


# -- hostile tables -----------------------------------------------------------------------------------------------


def _set(name: str, values: list[int], dtype=np.int64) -> Callable[[Path, Path], None]:
    def apply(root: Path, outside: Path) -> None:
        replace_column(root, name, np.array(values, dtype))
    return apply


def _retype(name: str, dtype) -> Callable[[Path, Path], None]:
    def apply(root: Path, outside: Path) -> None:
        replace_column(root, name, column(root, name).astype(dtype))
    return apply


def _table(value: Callable[[Path, Path], str]) -> Callable[[Path, Path], None]:
    def apply(root: Path, outside: Path) -> None:
        doc = header(root)
        doc["table"] = value(root, outside)
        write_header(root, doc)
    return apply


def _link_out(which: Callable[[Path], Path]) -> Callable[[Path, Path], None]:
    """Move ``which(root)`` out of the root and leave a symlink to it in its place."""
    def apply(root: Path, outside: Path) -> None:
        inside = which(root)
        moved = outside / inside.name
        shutil.move(inside, moved)
        inside.symlink_to(moved, target_is_directory=moved.is_dir())
    return apply


def _pickled(root: Path, outside: Path) -> None:
    replace_column(root, "samples", pickle.dumps(Payload(outside / "payload-ran")))


def _objects(root: Path, outside: Path) -> None:
    objects = np.empty(3, dtype=object)
    objects[:] = [Payload(outside / "payload-ran")] * 3
    replace_column(root, "samples", objects)


class Payload:
    """An object whose unpickling leaves a mark: the proof that a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


# (tampering, what the one line must say)
HOSTILE: dict[str, tuple[Callable[[Path, Path], None], str]] = {
    "wrong dtype": (_retype("samples", np.int32), r"samples\.npy holds int32\[3\], the header promises int64\[3\]"),
    "wrong length": (_set("id", [0, 1, 2, 3]), r"id\.npy holds int64\[4\], the header promises int64\[3\]"),
    "2-d": (_set("images.mtime_ns", [[0], [0], [0]]), r"images\.mtime_ns\.npy holds int64\[3, 1\]"),
    "ids out of order": (_set("id", [0, 2, 1]), r"shard id 1 at row 2 is listed twice or out of id order"),
    "ids duplicated": (_set("id", [0, 1, 1]), r"shard id 1 at row 2 is listed twice or out of id order"),
    "count sum": (_set("samples", [4, 4, 3]), r"the table's shards hold 11 samples, the header says 10"),
    "table ../..": (_table(lambda root, outside: "manifest.d/../.."),
                    r"table 'manifest\.d/\.\./\.\.' is not a manifest\.d/<snapshot> directory of this cache"),
    # (the value is shown cut to 80 characters)
    "table absolute": (_table(lambda root, outside: str(table_dir(root))),
                       r"table '/.* is not a manifest\.d/<snapshot>"),
    "table elsewhere": (_table(lambda root, outside: str(outside)), r"table '/.* is not a manifest\.d/<snapshot>"),
    "manifest.d linked out": (_link_out(lambda root: root / "manifest.d"),
                              (r"manifest\.d/[0-9a-f-]+ resolves to .*/outside/manifest\.d/[0-9a-f-]+, outside the "
                               r"cache root; replace the symlink")),
    "table linked out": (_link_out(table_dir), r"manifest\.d/[0-9a-f-]+ resolves to .*/outside/[0-9a-f-]+, outside"),
    "pickle": (_pickled, r"samples\.npy is not a plain \.npy array"),
    "object array": (_objects, r"samples\.npy is not a plain \.npy array"),
}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
@pytest.mark.slow
def test_a_hostile_table_is_one_line_naming_the_file_and_the_fix(native_cache: Path, tmp_path: Path, kind: str,
                                                                 capsys: pytest.CaptureFixture) -> None:
    build_manifest(native_cache)
    outside = tmp_path / "outside"
    outside.mkdir()
    tamper, match = HOSTILE[kind]
    tamper(native_cache, outside)
    outside_files = {p: p.read_bytes() for p in outside.rglob("*") if p.is_file()}
    for check in ("open", "all"):
        with pytest.raises(ManifestError, match=match) as info:
            ShardStore.open(native_cache, check=check)
        line = str(info.value)
        assert "\n" not in line and line.startswith(f"{native_cache / 'manifest.json'}: ")
        assert line.endswith(f"rebuild it with `shardstore build-manifest {native_cache}`")
    for command in ("info", "verify"):
        assert re.search(match, one_line_exit_2(capsys, command, str(native_cache)))
    assert not (outside / "payload-ran").exists(), "a pickle in the table was loaded"
    assert {p: p.read_bytes() for p in outside.rglob("*") if p.is_file()} == outside_files


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_a_rebuild_replaces_a_hostile_table(native_cache: Path, tmp_path: Path, kind: str) -> None:
    build_manifest(native_cache)
    outside = tmp_path / "outside"
    outside.mkdir()
    HOSTILE[kind][0](native_cache, outside)
    outside_files = {p: p.read_bytes() for p in outside.rglob("*") if p.is_file()}
    if kind == "manifest.d linked out":  # a build does not write through the link: it says what to do
        with pytest.raises(ManifestError, match=r"manifest\.d is not a directory of this cache \(a link or a file\); "
                                                r"remove it and rebuild"):
            build_manifest(native_cache)
        (native_cache / "manifest.d").unlink()
    build_manifest(native_cache)
    store = ShardStore.open(native_cache, check="all")
    assert store.shard_ids.tolist() == [0, 1, 2] and store.sample(9)["labels"] == 9 % 7
    assert {p: p.read_bytes() for p in outside.rglob("*") if p.is_file()} == outside_files, "a file outside changed"
    assert not (outside / "payload-ran").exists()


def test_a_pickled_column_is_refused_without_advising_allow_pickle(native_cache: Path, tmp_path: Path) -> None:
    build_manifest(native_cache)
    _pickled(native_cache, tmp_path)
    with pytest.raises(ManifestError, match=r"samples\.npy is not a plain \.npy array") as info:
        ShardStore.open(native_cache)
    assert "allow_pickle" not in str(info.value)


def test_a_column_linked_out_of_the_root_is_refused(native_cache: Path, tmp_path: Path) -> None:
    build_manifest(native_cache)
    outside = tmp_path / "outside"
    outside.mkdir()
    ids = table_dir(native_cache) / "id.npy"
    np.save(outside / "id.npy", np.arange(3, dtype=np.int64))  # a valid column: only the link is wrong
    ids.unlink()
    ids.symlink_to(outside / "id.npy")
    for check in ("open", "all"):
        with pytest.raises(ManifestError, match=r"id\.npy.*outside the cache root"):
            ShardStore.open(native_cache, check=check)


# Columns that only ``check="all"`` (and verify) validates; a store opened with the default check must still give
# a one-line ShardstoreError when it first uses the row, never a crash.
FULL_CHECK = {
    "layout out of range": ("layout", 7, r"a shard's layout or id width is out of range"),
    "id width 0": ("digits", 0, r"a shard's layout or id width is out of range"),
    "own field missing": ("images.offset", 0, r"shard 0 lacks field 'images', which every shard must have"),
    "offset inside the magic": ("images.offset", 4, r"field 'images': a data offset is inside the \.npy magic"),
}


@pytest.mark.parametrize("kind", sorted(FULL_CHECK))
def test_a_column_only_a_full_check_validates_is_refused_by_verify(native_cache: Path, kind: str,
                                                                    capsys: pytest.CaptureFixture) -> None:
    build_manifest(native_cache, checksum=True)
    name, value, match = FULL_CHECK[kind]
    values = column(native_cache, name)
    values[0] = value
    replace_column(native_cache, name, values)
    with pytest.raises(ManifestError, match=match) as info:
        ShardStore.open(native_cache, check="all")
    assert str(info.value).endswith(f"rebuild it with `shardstore build-manifest {native_cache}`")
    assert re.search(match, one_line_exit_2(capsys, "verify", str(native_cache)))


@pytest.mark.parametrize("kind", sorted(FULL_CHECK))
def test_a_column_only_a_full_check_validates_is_one_line_at_first_use(native_cache: Path, kind: str) -> None:
    build_manifest(native_cache)
    name, value, _ = FULL_CHECK[kind]
    values = column(native_cache, name)
    values[0] = value
    replace_column(native_cache, name, values)
    with pytest.raises(ShardstoreError) as info:  # at open (the one-byte columns are checked there) or first use
        ShardStore.open(native_cache).field(0, "images")
    assert "\n" not in str(info.value) and "build-manifest" in str(info.value)


def test_a_header_whose_table_is_gone_says_so_and_how_to_fix_it(native_cache: Path) -> None:
    build_manifest(native_cache)
    shutil.rmtree(native_cache / "manifest.d")
    with pytest.raises(ManifestError, match=r"manifest\.d/[0-9a-f-]+.*(missing|gone|does not exist).*"
                                            r"shardstore build-manifest"):
        ShardStore.open(native_cache)


def test_a_format3_header_read_away_from_its_table_is_a_manifest_error(native_cache: Path, tmp_path: Path) -> None:
    build_manifest(native_cache)
    text = (native_cache / "manifest.json").read_text()
    with pytest.raises(ManifestError, match="manifest.json"):
        Manifest.from_json(text, str(tmp_path / "manifest.json"))


# -- the snapshot GC ----------------------------------------------------------------------------------------------


def grow(root: Path, shard_id: int) -> None:
    with ShardWriter(root, 4, start_shard=shard_id, fsync=False) as w:
        w.add_batch(sample_arrays(4, start=4 * shard_id))


def test_a_build_keeps_the_current_and_the_previous_table_only(native_cache: Path) -> None:
    names = []
    for shard_id in range(3, 8):
        grow(native_cache, shard_id)
        build_manifest(native_cache)
        names.append(table_dir(native_cache).name)
        assert table_dirs(native_cache) == sorted(names[-2:])
    assert len(set(names)) == len(names)


def test_the_snapshot_gc_never_deletes_a_file_it_did_not_write(native_cache: Path, tmp_path: Path) -> None:
    build_manifest(native_cache)
    tables = native_cache / "manifest.d"
    first = table_dir(native_cache)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.npy").write_bytes(b"not the cache's")
    dead = subprocess.Popen(["true"])
    dead.wait()
    live_tmp = tables / f".{'a' * 16}-{'b' * 8}.tmp-{os.getpid()}"  # a build still writing (this process)
    dead_tmp = tables / f".{'c' * 16}-{'d' * 8}.tmp-{dead.pid}"  # a killed build's
    for d in (live_tmp, dead_tmp):
        d.mkdir()
        np.save(d / "id.npy", np.arange(3))
    user = {
        tables / "notes.txt": b"mine",
        tables / "keep.npy": b"mine too",
        tables / "mine" / "id.npy": b"a folder of mine",
        first / "notes.txt": b"in a table",
        dead_tmp / "notes.txt": b"in a killed build's temporary",
    }
    for path, data in user.items():
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
    (first / "linked.npy").symlink_to(outside / "precious.npy")

    for shard_id in range(3, 6):  # the first table becomes older than the previous one: the GC removes it
        grow(native_cache, shard_id)
        build_manifest(native_cache)
    assert first.name != table_dir(native_cache).name
    assert not list(first.glob("id.npy")) and not (dead_tmp / "id.npy").exists(), "what builds wrote is removed"
    for path, data in user.items():
        assert path.read_bytes() == data, f"{path} was not the GC's to delete"
    assert (first / "linked.npy").is_symlink() and (outside / "precious.npy").read_bytes() == b"not the cache's"
    assert (live_tmp / "id.npy").exists(), "a live build's temporary table was removed"
    assert ShardStore.open(native_cache, check="all").shard_ids.tolist() == list(range(6))


def test_the_snapshot_gc_keeps_a_user_npy_in_an_old_table(native_cache: Path) -> None:
    build_manifest(native_cache)
    mine = table_dir(native_cache) / "my_notes.npy"
    np.save(mine, np.arange(3))
    for shard_id in range(3, 6):
        grow(native_cache, shard_id)
        build_manifest(native_cache)
    assert mine.exists()
