"""cache-teacher never deletes or writes what is not its group's: names are identifiers, an edited declaration or
a field of the cache is refused, links and unrelated folders are left alone, and a full disk is one line."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from shardstore.cli import main
from shardstore.store import groups as groups_module
from shardstore.store.reader import load_manifest

from .conftest import overrides, write_tiny_cache

DEAD_PID = 2**22 + 12345


def tree(path: Path) -> dict[str, bytes]:
    """Every regular file under ``path`` (links not followed) with its content."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and not p.is_symlink()}


def run(capsys: pytest.CaptureFixture, cache: Path, *args: str) -> tuple[int, str, str]:
    """``shardstore cache-teacher`` with the tiny configs and a random teacher on the CPU."""
    sets = [a for o in overrides(cache.parent / "run", cache) for a in ("--set", o)]
    code = main(["cache-teacher", *sets, "--device", "cpu", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(code: int, out: str, err: str, *fragments: str) -> None:
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shardstore: error: "), err
    assert "Traceback" not in out + err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    """Two shards of 8 images (the smallest cache the teacher runs on)."""
    return write_tiny_cache(tmp_path / "cache", num_shards=2, shard_size=8)


FILL = ("--views", "1", "--topk", "2")


@pytest.mark.parametrize("name", ["../evil", "ABSOLUTE", "a b", "x" * 65])
def test_the_name_is_an_identifier(cache: Path, capsys: pytest.CaptureFixture, name: str) -> None:
    name = str(cache.parent / "evil") if name == "ABSOLUTE" else name
    before = sorted(p.name for p in cache.parent.iterdir())
    files = tree(cache)
    one_line_error(*run(capsys, cache, "--name", name, *FILL), f"group name {name!r} is not allowed",
                   "use a letter followed by letters, digits or underscores")
    one_line_error(*run(capsys, cache, "--name", name, "--check", "4"), "is not allowed")
    assert sorted(p.name for p in cache.parent.iterdir()) == before and tree(cache) == files


def test_overwrite_after_a_declaration_was_edited_to_name_labels_deletes_nothing(
        cache: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run(capsys, cache, *FILL)
    assert code == 0, err
    declaration = cache / "teacher.fields.json"
    doc = json.loads(declaration.read_text())
    doc["fields"]["labels"] = {"dtype": "<i8", "shape": []}
    declaration.write_text(json.dumps(doc))
    before = tree(cache)
    one_line_error(*run(capsys, cache, *FILL, "--overwrite"), "teacher.fields.json: bad field-group declaration",
                   "field 'labels' of group 'teacher' must be named teacher_<something>")
    assert tree(cache) == before and (cache / "shard_000000" / "labels.npy").exists()


def test_overwrite_leaves_links_and_unrelated_folders_alone(cache: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    code, _, err = run(capsys, cache, *FILL)
    assert code == 0, err
    outside = tmp_path / "outside"
    outside.mkdir()
    for name in ("teacher_views.npy", "teacher_topk_index.npy", "labels.npy"):
        (outside / name).write_bytes(b"not the cache's")
    (cache / "backup").symlink_to(outside)
    (cache / "notes").mkdir()
    (cache / "notes" / "teacher_views.npy").write_bytes(b"notes")
    (cache / "notes" / "labels.npy").write_bytes(b"notes")
    outside_before, notes_before = tree(outside), tree(cache / "notes")
    old = sorted(cache.glob("shard_*/teacher_*.npy"))
    code, out, err = run(capsys, cache, "--views", "2", "--topk", "3", "--overwrite")
    assert code == 0 and "filled 2 shard(s)" in out, err
    assert tree(outside) == outside_before and tree(cache / "notes") == notes_before
    assert sorted(cache.glob("shard_*/teacher_*.npy")) == old  # written again with 2 views
    assert all(np.load(p).shape[1] == 2 for p in old if p.name != "teacher_tail_logp.npy")


def test_a_new_group_may_not_take_a_field_of_the_cache(cache: Path, capsys: pytest.CaptureFixture) -> None:
    for shard in sorted(cache.glob("shard_*")):  # the cache's own field that a group of this name would write
        np.save(shard / "teacher_views.npy", np.zeros((8, 3), np.float32))
    assert main(["build-manifest", str(cache)]) == 0
    capsys.readouterr()
    before = tree(cache)
    one_line_error(*run(capsys, cache, *FILL), "field 'teacher_views' is already a field of the cache itself",
                   "choose another --name")
    after = tree(cache)
    assert {k: v for k, v in after.items() if k != "manifest.json"} == {
        k: v for k, v in before.items() if k != "manifest.json"}
    assert not (cache / "teacher.fields.json").exists()


def test_a_full_disk_during_the_fill_is_one_line_and_the_next_run_finishes(
        cache: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write, calls = groups_module.write_npy, []

    def full(f, array):  # the second shard's first file meets a full disk halfway
        calls.append(1)
        if len(calls) == 5:  # views, topk_index, topk_logp, tail_logp of shard 0; then shard 1
            f.write(b"\x93NUMPY")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(f, array)

    monkeypatch.setattr(groups_module, "write_npy", full)
    before = tree(cache)
    one_line_error(*run(capsys, cache, *FILL), "no space left on device: writing ", "shard_000001",
                   "nothing was replaced")
    monkeypatch.undo()
    after = tree(cache)
    assert {k: after[k] for k in before if k != "manifest.json"} == {k: v for k, v in before.items()
                                                                      if k != "manifest.json"}
    assert not [k for k in after if ".tmp-" in k]
    assert not list((cache / "shard_000001").glob("teacher_*"))
    assert len(list((cache / "shard_000000").glob("teacher_*.npy"))) == 4
    code, out, err = run(capsys, cache, *FILL)
    assert code == 0 and "filled 1 shard(s)" in out and "1 already had them" in out, err


def test_stale_declaration_temporaries_are_removed(cache: Path, capsys: pytest.CaptureFixture) -> None:
    stale = [cache / f".teacher.fields.json.tmp-{DEAD_PID}-ab12", cache / f".other.fields.json.tmp-{DEAD_PID}-cd34"]
    live = cache / f".other.fields.json.tmp-{os.getpid()}-ef56"
    for p in (*stale, live):
        p.write_bytes(b"{")
    code, _, err = run(capsys, cache, *FILL)
    assert code == 0, err
    assert not any(p.exists() for p in stale) and live.exists()


@pytest.mark.slow
def test_cache_teacher_on_a_really_full_tmpfs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A real ENOSPC (numpy's own writer reports it without an errno): one line, the cache as it was."""
    mount = tmp_path / "small"
    mount.mkdir()
    # 512k: the cache, its first group and two manifest snapshots (a table's columns take a page each) fit
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        cache = write_tiny_cache(mount / "cache", num_shards=4, shard_size=32)
        code, _, err = run(capsys, cache, "--views", "1", "--topk", "2", "--name", "small")
        assert code == 0, err
        before = tree(cache)
        code, out, err = run(capsys, cache, "--views", "16", "--dense", "--embeddings", "--name", "big")
        one_line_error(code, out, err, "no space left on device: writing ", "free space on that file system",
                       "nothing was replaced")
        after = tree(cache)
        assert not [k for k in after if ".tmp-" in k]
        def data(files: dict) -> dict:  # the manifest's snapshots may be replaced; the shards and groups not
            return {k: v for k, v in files.items() if k != "manifest.json" and not k.startswith("manifest.d/")}

        # Shards of the big group finished before the disk filled are kept (the next run fills the rest);
        # nothing of the cache or of the first group changed.
        kept, new = data(after), set(data(after)) - set(data(before))
        assert {k: kept[k] for k in data(before)} == data(before)
        assert all(k == "big.fields.json" or k.split("/")[-1].startswith("big_") for k in new), new
        listed = load_manifest(cache)
        assert listed.num_shards == 4 and "small_views" in listed.fields
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], check=False)


def test_training_from_targets_with_a_bad_name_is_one_line(cache: Path) -> None:
    from shardstore.errors import ConfigError
    from shardstore.kd.target_spec import read_target_spec

    with pytest.raises(ConfigError, match=r"group name '\.\./cache/x' is not allowed"):
        read_target_spec(cache, "../cache/x")


def test_the_fill_does_not_write_through_a_linked_shard_directory(cache: Path, capsys: pytest.CaptureFixture) -> None:
    (cache / "shard_000001").rename(cache / "kept_here")
    (cache / "shard_000001").symlink_to("kept_here")  # inside the root, so the store opens it
    assert main(["build-manifest", str(cache)]) == 0
    capsys.readouterr()
    one_line_error(*run(capsys, cache, *FILL), "shard_000001 is a symbolic link",
                   "replace the link with the directory itself")
    assert sorted(p.name for p in (cache / "kept_here").iterdir()) == ["images.npy", "labels.npy"]
