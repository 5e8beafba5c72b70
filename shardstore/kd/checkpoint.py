"""Training checkpoints: written atomically, the last K per epoch plus the best and a recovery one kept.

Layout under ``RUN_DIR/checkpoints/``: ``epoch_0003.pt`` after each epoch (the last
``keep_last`` kept), ``best.pt`` (a copy of the best epoch by the chosen metric),
``recovery.pt`` inside epochs (every ``every_steps`` optimizer steps, every ``every_minutes``
minutes, and when a stop signal comes; dropped once an epoch checkpoint is newer), and
``latest.json`` naming the newest of them. Every file goes
through ``shardstore.store.atomic.write_atomic``: a reader sees the old file or the new one,
a full disk is one ``DiskFullError`` line, and no temporary outlives a failed write.

The writes after an epoch are ordered so the newest complete checkpoint is always reachable:
the epoch file, then ``latest.json`` naming it, then ``best.pt``. A failure at any step leaves
the steps before it in place; a ``best.pt`` copy that failed is made again on resume
(:meth:`CheckpointManager.restore_best`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

import torch

from shardstore.errors import ConfigError
from shardstore.kd.models.io import read_torch_file
from shardstore.store.atomic import fsync_dir, remove_stale_temporaries, write_atomic
from shardstore.store.layout import TEMP_FILE

EPOCH_RE = re.compile(r"^epoch_(\d{4,})\.pt$")
# The files a CheckpointManager writes into its folder (their temporaries are its own to clean up).
OWN_FILE_RE = re.compile(r"^(epoch_\d{4,}\.pt|recovery\.pt|best\.pt|latest\.json)$")
RESUME_FIX = "resume from another file in the run's checkpoints folder (--resume-from PATH)"


class _RecordingWriter:
    """A file object for ``torch.save`` that keeps the ``OSError`` of a failed write.

    ``torch.save`` reports a failed write as a ``RuntimeError`` of its own; the ``OSError``
    under it (a full disk) is what ``write_atomic`` turns into a ``DiskFullError``.
    """

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self._f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        try:
            self._f.flush()
        except OSError as exc:
            self.error = exc
            raise


def save_state(state: dict[str, Any], f: BinaryIO) -> None:
    """``torch.save(state)`` into the open binary file ``f``; a failed write is raised as its ``OSError``."""
    out = _RecordingWriter(f)
    try:
        torch.save(state, out)  # type: ignore[arg-type]  # only write() and flush() are used
    except RuntimeError:
        if out.error is not None:
            raise out.error from None
        raise


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Replace ``path`` with ``state`` all or nothing (see ``write_atomic``)."""
    write_atomic(path, lambda f: save_state(state, f))


class CheckpointManager:
    """Saves and finds a run's checkpoints (call it on the rank that writes: rank 0)."""

    def __init__(self, run_dir: Path, *, keep_last: int = 3, keep_best: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / "checkpoints"
        self.keep_last = keep_last
        self.keep_best = keep_best

    def remove_stale_temporaries(self, run_files: Iterable[str] = ()) -> int:
        """Delete the temporaries killed writers left: checkpoint-sized ``.recovery.pt.tmp-*``, ``.epoch_*.pt.tmp-*``,
        ``.latest.json.tmp-*``, ``.best.pt.tmp-*`` and those of ``run_files`` in the run directory.

        Only files whose writer process is gone, and only temporaries of files this run writes.
        Call it on the rank that writes: a writer's pid means something on its own node only.
        """
        names = set()
        try:
            entries = os.listdir(self.dir)
        except OSError:
            entries = []
        for entry in entries:
            if TEMP_FILE.match(entry):
                name = entry[1:entry.rindex(".tmp-")]
                if OWN_FILE_RE.match(name):
                    names.add(name)
        removed = sum(remove_stale_temporaries(self.dir, name) for name in sorted(names))
        return removed + sum(remove_stale_temporaries(self.run_dir, name) for name in run_files)

    def _point_latest(self, path: Path, global_step: int) -> None:
        doc = json.dumps({"path": path.name, "global_step": global_step}).encode()
        write_atomic(self.dir / "latest.json", lambda f: f.write(doc), size_hint=len(doc))

    def save_epoch(self, state: dict[str, Any], epoch: int, *, is_best: bool) -> Path:
        """Checkpoint after ``epoch``; prunes older epoch files and the recovery file it supersedes."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"epoch_{epoch:04d}.pt"
        save_checkpoint(state, path)  # 1. complete under its final name
        self._point_latest(path, int(state["global_step"]))  # 2. resume continues from it from now on
        (self.dir / "recovery.pt").unlink(missing_ok=True)  # superseded (and its space is free for best.pt)
        # Only epochs up to this one: a run resumed from an older checkpoint must not prune the file it just wrote.
        epochs = sorted(p for p in self.dir.iterdir() if (m := EPOCH_RE.match(p.name)) and int(m.group(1)) <= epoch)
        for old in epochs[: max(0, len(epochs) - self.keep_last)]:
            old.unlink(missing_ok=True)
        fsync_dir(self.dir)
        if is_best and self.keep_best:
            self._copy_best(path)  # 3. last: if it fails, the epoch above is kept and reachable
        return path

    def _copy_best(self, source: Path) -> None:
        def copy(f: BinaryIO) -> None:
            with open(source, "rb") as src:
                shutil.copyfileobj(src, f, 1 << 20)

        write_atomic(self.dir / "best.pt", copy, size_hint=source.stat().st_size)

    def restore_best(self, epoch: int | None) -> bool:
        """Make ``best.pt`` the checkpoint of ``epoch`` (the run's best) again if its copy did not finish.

        ``best.pt`` is written after the epoch file it copies, so one that is not newer than
        that file is an older epoch's (its copy failed). Returns True when it copied.
        """
        if epoch is None or not self.keep_best:
            return False
        source, best = self.dir / f"epoch_{epoch:04d}.pt", self.dir / "best.pt"
        try:
            source_mtime = source.stat().st_mtime_ns
        except FileNotFoundError:
            return False  # pruned (keep_last): best.pt is the only copy left
        try:
            if best.stat().st_mtime_ns > source_mtime:
                return False
        except FileNotFoundError:
            pass
        self._copy_best(source)
        return True

    def save_recovery(self, state: dict[str, Any]) -> Path:
        """A checkpoint inside an epoch (overwrites the previous recovery checkpoint)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / "recovery.pt"
        save_checkpoint(state, path)
        self._point_latest(path, int(state["global_step"]))
        return path

    def latest_pointer_exists(self) -> bool:
        """True when the run directory already records a checkpoint (of this run or an earlier one)."""
        return (self.dir / "latest.json").exists()

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None when the run has none."""
        pointer = self.dir / "latest.json"
        if not pointer.exists():
            return None
        try:
            name = json.loads(pointer.read_text())["path"]
        except (ValueError, KeyError, TypeError, OSError) as exc:
            raise ConfigError(f"{pointer}: unreadable ({exc}); pass --resume-from PATH to a checkpoint file") from None
        if not isinstance(name, str) or not OWN_FILE_RE.match(name):
            raise ConfigError(f"{pointer} names {name!r}, not a checkpoint of this folder; "
                              "pass --resume-from PATH to a checkpoint file")
        path = self.dir / name
        if not path.exists():
            raise ConfigError(f"{pointer} names {name}, which is missing; pass --resume-from PATH to a checkpoint file")
        return path

    def epoch_before(self, epoch: int) -> Path | None:
        """The newest end-of-epoch checkpoint of an epoch before ``epoch``, if one is kept."""
        found = [(int(m.group(1)), p) for p in self.dir.glob("epoch_*.pt") if (m := EPOCH_RE.match(p.name))]
        earlier = [p for e, p in sorted(found) if e < epoch]
        return earlier[-1] if earlier else None


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint without running code (``weights_only=True``); ``ConfigError`` naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such checkpoint file; pass a file from RUN_DIR/checkpoints")
    state = read_torch_file(path, fix=RESUME_FIX)
    if not isinstance(state, dict) or "student" not in state or "global_step" not in state:
        raise ConfigError(f"{path}: not a shardstore training checkpoint (no student weights or step); {RESUME_FIX}")
    return state
