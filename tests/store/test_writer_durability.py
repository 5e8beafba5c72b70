"""ShardWriter with fsync=True: each field file is flushed to disk before its shard is renamed into place."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import shardstore.store.writer as writer_mod
from shardstore import ShardWriter


def test_field_files_are_fsynced_before_rename_and_directory_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[tuple[str, str]] = []
    real_fsync, real_rename, real_fsync_dir = os.fsync, os.rename, writer_mod.fsync_dir

    def fsync(fd: int) -> None:
        events.append(("fsync", os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))))
        real_fsync(fd)

    def rename(src, dst) -> None:  # noqa: ANN001
        events.append(("rename", Path(dst).name))
        real_rename(src, dst)

    def fsync_dir(path) -> None:  # noqa: ANN001
        events.append(("fsync_dir", Path(path).name))
        real_fsync_dir(path)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(writer_mod, "fsync_dir", fsync_dir)
    root = tmp_path / "c"
    with ShardWriter(root, 2, fsync=True) as w:
        w.add_batch({"x": np.arange(4, dtype=np.float32).reshape(2, 2), "y": np.arange(2)})
    monkeypatch.undo()

    assert (root / "shard_000000" / "x.npy").is_file()
    renames = [i for i, e in enumerate(events) if e == ("rename", "shard_000000")]
    assert len(renames) == 1, events
    at = renames[0]
    before = events[:at]
    for name in ("x.npy", "y.npy"):
        assert ("fsync", name) in before, f"{name} not fsynced before the rename: {events}"
    assert ("fsync_dir", "c") in events[at + 1 :], f"the directory was not fsynced after the rename: {events}"
