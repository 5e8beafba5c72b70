"""Training checkpoints: written atomically, the last K per epoch plus the best and a recovery one kept.

Layout under ``RUN_DIR/checkpoints/``: ``epoch_0003.pt`` after each epoch (the last
``keep_last`` kept), ``best.pt`` (a copy of the best epoch by the chosen metric),
``recovery.pt`` inside long epochs (every ``every_steps`` optimizer steps; dropped once an
epoch checkpoint is newer), and ``latest.json`` naming the newest of them. Every file is
written under a temporary name, fsynced and renamed, so a reader never sees half of one;
``latest.json`` is replaced only after the checkpoint it names is complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from shardstore.errors import ConfigError
from shardstore.store.atomic import fsync_dir, temporary_sibling, write_bytes_atomic

EPOCH_RE = re.compile(r"^epoch_(\d{4,})\.pt$")


def _save_atomic(state: dict[str, Any], path: Path) -> None:
    tmp = temporary_sibling(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


class CheckpointManager:
    """Saves and finds a run's checkpoints (call it on the rank that writes: rank 0)."""

    def __init__(self, run_dir: Path, *, keep_last: int = 3, keep_best: bool = True) -> None:
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.keep_best = keep_best

    def _point_latest(self, path: Path, global_step: int) -> None:
        doc = {"path": path.name, "global_step": global_step}
        write_bytes_atomic(self.dir / "latest.json", json.dumps(doc).encode())

    def save_epoch(self, state: dict[str, Any], epoch: int, *, is_best: bool) -> Path:
        """Checkpoint after ``epoch``; prunes older epoch files and the recovery file it supersedes."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"epoch_{epoch:04d}.pt"
        _save_atomic(state, path)
        if is_best and self.keep_best:
            tmp = temporary_sibling(self.dir / "best.pt")
            shutil.copyfile(path, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self.dir / "best.pt")
        self._point_latest(path, int(state["global_step"]))
        (self.dir / "recovery.pt").unlink(missing_ok=True)
        # Only epochs up to this one: a run resumed from an older checkpoint must not prune the file it just wrote.
        epochs = sorted(p for p in self.dir.iterdir() if (m := EPOCH_RE.match(p.name)) and int(m.group(1)) <= epoch)
        for old in epochs[: max(0, len(epochs) - self.keep_last)]:
            old.unlink(missing_ok=True)
        fsync_dir(self.dir)
        return path

    def save_recovery(self, state: dict[str, Any]) -> Path:
        """A checkpoint inside an epoch (overwrites the previous recovery checkpoint)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / "recovery.pt"
        _save_atomic(state, path)
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
        except (ValueError, KeyError, OSError) as exc:
            raise ConfigError(f"{pointer}: unreadable ({exc}); pass --resume PATH to a checkpoint file") from None
        path = self.dir / name
        if not path.exists():
            raise ConfigError(f"{pointer} names {name}, which is missing; pass --resume PATH to a checkpoint file")
        return path


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint without running code (``weights_only=True``); ``ConfigError`` naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such checkpoint file; pass a file from RUN_DIR/checkpoints")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which, and what to do
        raise ConfigError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                          "resume from another file in the run's checkpoints folder") from None
    if not isinstance(state, dict) or "student" not in state or "global_step" not in state:
        raise ConfigError(f"{path}: not a shardstore training checkpoint (no student weights or step)")
    return state
