"""A full disk, for real: a small tmpfs is mounted and write, build-manifest, train and cache-teacher run out of
space on it. Each ends with exit code 2 and one line saying there is no space (no traceback), leaves no temporary,
and everything written before (shards, manifest, checkpoints) still loads. Skipped where no tmpfs can be mounted."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from shardstore import ShardWriter
from shardstore.kd.checkpoint import load_checkpoint
from shardstore.store.reader import load_manifest
from tests.conftest import sample_arrays

from .harness import (
    assert_one_line_error,
    assert_visible_npy_load,
    cli,
    file_digests,
    run_sets,
    temporaries,
    tiny_cache,
    warm,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """``small_disk(kib)`` mounts a tmpfs of that size and returns its directory; unmounted at the end."""
    mounted: list[Path] = []

    def mount(kib: int) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs for the full-disk attack needs root")
        if shutil.which("mount") is None:
            pytest.skip("no mount command on this machine")
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip() or proc.returncode}")
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        subprocess.run(["umount", str(where)], capture_output=True)
        if os.path.ismount(where):
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill_up(disk: Path, leave: int = 0) -> Path:
    """Write a filler file until the disk is full, then give back ``leave`` bytes."""
    filler = disk / "filler.bin"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    block = b"\0" * 4096
    try:
        while True:
            os.write(fd, block)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    if leave:
        os.ftruncate(fd, max(0, os.fstat(fd).st_size - leave))
    os.close(fd)
    return filler


def assert_no_space(outcome, *needles: str) -> str:
    return assert_one_line_error(outcome, "no space", *needles)


def test_write_into_a_full_disk_is_one_line_and_keeps_the_shards_before(tmp_path: Path, small_disk) -> None:
    disk = small_disk(512)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (2000, 3, 16, 16), dtype=np.uint8)  # 1.5 MB: three times the disk
    labels = rng.integers(0, 10, 2000).astype(np.int64)
    np.save(inputs / "images_small.npy", images[:64])
    np.save(inputs / "labels_small.npy", labels[:64])
    np.save(inputs / "images.npy", images)
    np.save(inputs / "labels.npy", labels)
    root = disk / "cache"
    warm()
    first = cli("write", root, f"--from-npy=images={inputs / 'images_small.npy'}",
                f"--from-npy=labels={inputs / 'labels_small.npy'}", "--shard-size=16")
    assert first.code == 0, first.describe()
    before = file_digests(root)
    manifest = (root / "manifest.json").read_text()

    full = cli("write", root, f"--from-npy=images={inputs / 'images.npy'}",
               f"--from-npy=labels={inputs / 'labels.npy'}",
               "--shard-size=16")
    line = assert_no_space(full)
    after = file_digests(root)
    assert {k: after.get(k) for k in before} == before, "shards written before the disk filled changed"
    assert (root / "manifest.json").read_text() == manifest
    assert_visible_npy_load(root)  # the shards of the second job that made it are whole
    assert temporaries(root) == [], "the shard being written when the disk filled was left behind"
    print(f"\nattack disk full, write: {line}")


def test_build_manifest_on_a_full_disk_keeps_the_old_manifest(tmp_path: Path, small_disk) -> None:
    disk = small_disk(4096)  # a tmpfs charges a 4 KiB page per small file
    root = disk / "cache"
    with ShardWriter(root, 2, fsync=False) as w:
        w.add_batch(sample_arrays(20))
    warm()
    assert cli("build-manifest", root).code == 0
    old = (root / "manifest.json").read_text()
    with ShardWriter(root, 2, start_shard=10, fsync=False) as w:  # 150 more shards: a manifest ~15x larger
        w.add_batch(sample_arrays(300, start=20))
    shards = file_digests(root)
    fill_up(disk)

    full = cli("build-manifest", root)
    line = assert_no_space(full)
    # The table is written first (manifest.d/), then the header (manifest.json): the line names the one it was writing.
    assert "manifest.d/" in line or "manifest.json" in line, line
    assert (root / "manifest.json").read_text() == old, "the old manifest was lost"
    assert load_manifest(root, check="all").num_shards == 10, "the old manifest's table was lost"
    assert file_digests(root) == shards
    assert temporaries(root) == []
    (disk / "filler.bin").unlink()
    again = cli("build-manifest", root)
    assert again.code == 0, again.describe()
    assert load_manifest(root, check="all").num_shards == 160
    print(f"\nattack disk full, build-manifest: {line}")


def test_train_on_a_full_disk_keeps_the_last_checkpoint(tmp_path: Path, small_disk) -> None:
    disk = small_disk(4096)
    cache = tiny_cache(tmp_path / "cache")
    run_dir = disk / "run"
    warm()
    first = cli("train", *run_sets(run_dir, cache, train__epochs=1), "--device", "cpu")
    assert first.code == 0, first.describe()
    ckpts = run_dir / "checkpoints"
    pointer = json.loads((ckpts / "latest.json").read_text())
    step = int(load_checkpoint(ckpts / pointer["path"])["global_step"])
    checkpoint_bytes = (ckpts / pointer["path"]).stat().st_size
    fill_up(disk, leave=checkpoint_bytes // 3)  # room for log lines, not for another checkpoint

    full = cli("train", *run_sets(run_dir, cache, train__epochs=2), "--resume", "--device", "cpu")
    line = assert_no_space(full)
    latest = json.loads((ckpts / "latest.json").read_text())
    state = load_checkpoint(ckpts / latest["path"])
    assert int(state["global_step"]) >= step, "the newest complete checkpoint is no longer reachable"
    for path in ckpts.glob("[!.]*.pt"):
        load_checkpoint(path)
    assert temporaries(run_dir) == [], "a partial checkpoint temporary was left on the full disk"
    (disk / "filler.bin").unlink()
    again = cli("train", *run_sets(run_dir, cache, train__epochs=2), "--resume", "--device", "cpu")
    assert again.code == 0, again.describe()
    print(f"\nattack disk full, train: {line}")


def test_cache_teacher_on_a_full_disk_leaves_the_cache_whole(tmp_path: Path, small_disk) -> None:
    disk = small_disk(1024)
    root = tiny_cache(disk / "cache")
    base = file_digests(root)
    manifest = (root / "manifest.json").read_text()
    fill_up(disk, leave=4 * 4096)  # room for the manifest and the declaration, not for the targets
    warm()
    sets = run_sets(tmp_path / "run", root)
    full = cli("cache-teacher", *sets, "--views", "2", "--topk", "3", "--device", "cpu")
    line = assert_no_space(full)
    after = file_digests(root)
    assert {k: after.get(k) for k in base} == base, "the cache's own files changed"
    assert_visible_npy_load(root)
    after_manifest = load_manifest(root, check="all")
    assert (root / "manifest.json").read_text() == manifest or after_manifest.num_shards == 6
    assert temporaries(root) == []
    (disk / "filler.bin").unlink()
    again = cli("cache-teacher", *sets, "--views", "2", "--topk", "3", "--device", "cpu")
    assert again.code == 0, again.describe()
    print(f"\nattack disk full, cache-teacher: {line}")
