"""Checkpoint files: all-or-nothing writes, the order that keeps the newest one reachable, stale temporaries, and
one-line errors for files that are not checkpoints."""

from __future__ import annotations

import errno
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from shardstore.errors import ConfigError, DiskFullError
from shardstore.kd.checkpoint import CheckpointManager, load_checkpoint, save_state
from shardstore.kd.models import build_model, load_checkpoint_into

DEAD_PID = 4_194_305  # above PID_MAX_LIMIT (2**22): no process can have it


def state(step: int) -> dict:
    return {"student": {"w": torch.full((64,), float(step))}, "global_step": step}


def temporaries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name)


def fail_fsync_of(monkeypatch: pytest.MonkeyPatch, prefix: str) -> None:
    """``os.fsync`` of a file whose name starts with ``prefix`` reports a full disk (as NFS or XFS may, at fsync)."""
    real = os.fsync

    def fsync(fd: int) -> None:
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(prefix):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def test_a_checkpoint_write_killed_midway_keeps_the_previous_file(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    manager = CheckpointManager(tmp_path)
    manager.save_recovery(state(1))
    manager.save_epoch(state(2), 0, is_best=True)
    manager.save_recovery(state(3))
    real_save = torch.save

    def killed_midway(obj: object, f: object, *args: object, **kwargs: object) -> None:
        buf = io.BytesIO()
        real_save(obj, buf)
        half = buf.getvalue()[: len(buf.getvalue()) // 2]
        if isinstance(f, (str, os.PathLike)):
            Path(f).write_bytes(half)
        else:
            f.write(half)  # type: ignore[attr-defined]
        raise RuntimeError("killed in the middle of the write")

    monkeypatch.setattr(torch, "save", killed_midway)
    with pytest.raises(RuntimeError, match="killed"):
        manager.save_recovery(state(4))
    with pytest.raises(RuntimeError, match="killed"):
        manager.save_epoch(state(5), 0, is_best=True)  # the same epoch again: replaces epoch_0000.pt and best.pt
    monkeypatch.setattr(torch, "save", real_save)
    assert load_checkpoint(manager.dir / "recovery.pt")["global_step"] == 3
    assert load_checkpoint(manager.dir / "epoch_0000.pt")["global_step"] == 2
    assert load_checkpoint(manager.dir / "best.pt")["global_step"] == 2
    assert load_checkpoint(manager.latest())["global_step"] == 3
    assert temporaries(manager.dir) == []


@pytest.mark.parametrize("failing", [".epoch_0001.pt.tmp-", ".latest.json.tmp-", ".best.pt.tmp-"])
def test_a_full_disk_at_each_step_of_an_epoch_save_keeps_the_newest_complete_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str) -> None:
    manager = CheckpointManager(tmp_path)
    manager.save_epoch(state(1), 0, is_best=True)
    fail_fsync_of(monkeypatch, failing)
    with pytest.raises(DiskFullError, match=r"^no space left on device: writing .*; free space") as err:
        manager.save_epoch(state(2), 1, is_best=True)
    assert "\n" not in str(err.value)
    monkeypatch.undo()
    assert temporaries(manager.dir) == []  # no partial temporary left behind
    # Once the epoch file is complete, resume finds it even if best.pt could not be written.
    best_copy_failed = failing == ".best.pt.tmp-"
    assert manager.latest().name == ("epoch_0001.pt" if best_copy_failed else "epoch_0000.pt")
    assert load_checkpoint(manager.latest())["global_step"] == (2 if best_copy_failed else 1)
    assert load_checkpoint(manager.dir / "best.pt")["global_step"] == 1
    # Resume makes the copy the full disk interrupted (the run's best epoch is in its checkpoint).
    best_epoch = 1 if best_copy_failed else 0
    assert manager.restore_best(best_epoch) is best_copy_failed
    assert load_checkpoint(manager.dir / "best.pt")["global_step"] == (2 if best_copy_failed else 1)
    assert manager.restore_best(best_epoch) is False  # up to date: not copied again


def test_a_failed_write_inside_torch_save_is_its_oserror() -> None:
    class FullDisk(io.RawIOBase):
        written = 0

        def writable(self) -> bool:
            return True

        def write(self, data: bytes) -> int:  # type: ignore[override]
            self.written += len(data)
            if self.written > 512:
                raise OSError(errno.ENOSPC, "No space left on device")
            return len(data)

    with pytest.raises(OSError) as err:  # torch.save alone raises a RuntimeError without the errno
        save_state(state(1), FullDisk())  # type: ignore[arg-type]
    assert err.value.errno == errno.ENOSPC


def test_stale_temporaries_of_killed_writers_are_removed(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    manager.dir.mkdir(parents=True)
    dead = [".recovery.pt.tmp-{}-ab12", ".epoch_0003.pt.tmp-{}-cd34", ".latest.json.tmp-{}-ef56",
            ".best.pt.tmp-{}-0a0a"]
    kept = [".best.pt.tmp-{live}-1b1b", ".notes.txt.tmp-{dead}-2c2c"]  # a live writer's; not a checkpoint's
    for name in dead:
        (manager.dir / name.format(DEAD_PID)).write_bytes(b"x" * 1000)
    for name in kept:
        (manager.dir / name.format(live=os.getpid(), dead=DEAD_PID)).write_bytes(b"x")
    (tmp_path / f".config.yaml.tmp-{DEAD_PID}-aa").write_bytes(b"x")
    (tmp_path / f".mine.yaml.tmp-{DEAD_PID}-bb").write_bytes(b"x")  # the user's own file in the run directory
    assert manager.remove_stale_temporaries(["config.yaml"]) == 5
    assert temporaries(manager.dir) == sorted(n.format(live=os.getpid(), dead=DEAD_PID) for n in kept)
    assert temporaries(tmp_path) == [f".mine.yaml.tmp-{DEAD_PID}-bb"]


def test_latest_json_naming_a_file_outside_the_folder_is_refused(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    manager.save_epoch(state(1), 0, is_best=False)
    (tmp_path / "outside.pt").write_bytes((manager.dir / "epoch_0000.pt").read_bytes())
    (manager.dir / "latest.json").write_text(json.dumps({"path": "../outside.pt", "global_step": 1}))
    with pytest.raises(ConfigError, match=r"names '\.\./outside\.pt', not a checkpoint of this folder; pass "
                                          r"--resume-from PATH"):
        manager.latest()


class Payload:
    """A class instance in a checkpoint: loading it would import and build it (arbitrary code)."""


def test_files_that_are_not_checkpoints_are_one_clear_line(tmp_path: Path) -> None:
    torch.save({"student": {}, "global_step": 1, "extra": Payload()}, tmp_path / "pickled.pt")
    (tmp_path / "text.pt").write_text("hello, this is a text file\n")
    np.save(tmp_path / "array.npy", np.zeros(3))
    (tmp_path / "empty.pt").write_bytes(b"")
    cases = {
        "pickled.pt": r"pickled.pt: holds pickled Python objects \(.*Payload\), refused for safety: loading them "
                      r"would run code, and only tensors and state dicts are loaded",
        "text.pt": r"text.pt: is not a readable torch.save file",
        "array.npy": r"array.npy: is a NumPy .npy file, not a torch.save file",
        "empty.pt": r"empty.pt: is empty \(0 bytes\)",
    }
    model = build_model("cnn_small", 10, image_size=8)
    for name, message in cases.items():
        with pytest.raises(ConfigError, match=message + r".*resume from another file") as err:
            load_checkpoint(tmp_path / name)
        assert "\n" not in str(err.value) and "weights_only" not in str(err.value) and "\x1b" not in str(err.value)
        with pytest.raises(ConfigError, match=message) as err:  # the same file given as a teacher checkpoint
            load_checkpoint_into(model, tmp_path / name)
        assert "\n" not in str(err.value) and "weights_only" not in str(err.value)


def test_a_full_disk_under_the_metrics_log_is_one_line(tmp_path: Path) -> None:
    from shardstore.kd.metrics import MetricsLog

    class Full(io.StringIO):
        def write(self, text: str) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    log = MetricsLog(tmp_path)
    log._file.close()
    log._file = Full()  # type: ignore[assignment]
    with pytest.raises(DiskFullError, match=r"^no space left on device: writing .*metrics.jsonl needs \d+ bytes"):
        log.write("step", {"global_step": 1, "loss": 0.5})
