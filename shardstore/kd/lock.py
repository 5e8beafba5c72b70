"""One writer per run directory: ``RUN_DIR/.lock``, held with ``flock`` for as long as a run writes there.

Two runs writing one run directory interleave checkpoints and metrics lines, and each resume
would continue the other's state. The lock is an exclusive ``flock`` on ``RUN_DIR/.lock``: the
kernel drops it when its process ends however it ends (SIGKILL, a node's OOM killer), so a
crashed run never blocks the next one. The file holds the holder's pid, host and start time
for the messages: a refused run names its holder, and a run that finds the record of an ended
holder says it takes over. The file is emptied on release and never deleted (deleting a lock
file lets two processes lock two different files of the same name).

On a file system without ``flock`` (some network mounts) the run goes on with a warning.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import stat
import time
from pathlib import Path
from typing import Any

from shardstore.errors import ConfigError
from shardstore.kd import distributed

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS}


class RunDirLock:
    """The exclusive lock on ``run_dir/.lock``; ``acquire`` is idempotent and ``release`` is always safe."""

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock; ``ConfigError`` naming the holder's pid and host when another process has it."""
        if self._fd is not None:
            return
        try:
            # O_NOFOLLOW: a planted symlink named .lock must not make the run write into another file.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise ConfigError(f"{self.path}: cannot open the run directory's lock file "
                              f"({exc.strerror or type(exc).__name__}); choose a train.run_dir you can write to, "
                              "or remove that path if it is not a plain file") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            # A hard link to a file elsewhere (or a FIFO, a device) would be emptied by the record's ftruncate.
            os.close(fd)
            what = "a hard link to another file" if stat.S_ISREG(st.st_mode) else "not a plain file"
            raise ConfigError(f"{self.path}: the run directory's lock file is {what}; remove it (shardstore "
                              "makes its own), or choose another train.run_dir")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(_read_record(fd))
            os.close(fd)
            raise ConfigError(f"train.run_dir {self.path.parent} is in use by another run ({holder}); wait for it "
                              "to end (or stop it), or choose another train.run_dir") from None
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:
                os.close(fd)
                raise
            log.warning("%s: this file system does not support file locks (%s); nothing stops a second run from "
                        "writing into %s at the same time", self.path, exc.strerror, self.path.parent)
        previous = _read_record(fd)
        if previous and previous.get("pid") is not None:
            log.warning("train.run_dir %s: taking over the lock of %s, which ended without releasing it",
                        self.path.parent, _describe(previous))
        self._fd = fd
        self._write_record()

    def acquire_on_main(self, info: distributed.DistInfo) -> None:
        """Rank 0 takes the lock; a refusal is raised on every rank, so none waits for a rank that stopped."""
        problem = None
        if info.is_main:
            try:
                self.acquire()
            except ConfigError as exc:
                problem = str(exc)
        problem = distributed.broadcast_object(problem, info)
        if problem is not None:
            raise ConfigError(str(problem))

    def _write_record(self) -> None:
        assert self._fd is not None
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode() + b"\n"
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, record, 0)
        except OSError as exc:  # a full disk: the lock holds all the same, only the record for messages is missing
            log.info("%s: could not record the holder (%s)", self.path, exc.strerror)

    def release(self) -> None:
        """Empty the record and drop the lock (the file stays)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        os.close(fd)  # closing the last descriptor drops the flock

    def __enter__(self) -> RunDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_record(fd: int) -> dict[str, Any]:
    try:
        data = os.pread(fd, 4096, 0)
        record = json.loads(data) if data.strip() else {}
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _describe(record: dict[str, Any]) -> str:
    """``pid 1234 on host node07, started 2024-05-01T10:00:00+0000`` (what the record says, checked to be text)."""
    pid, host, started = record.get("pid"), record.get("host"), record.get("started")
    if not isinstance(pid, int):
        return "a process whose pid is not recorded"
    text = f"pid {pid}"
    if isinstance(host, str) and host.isprintable() and len(host) <= 255:
        text += f" on host {host}"
    if isinstance(started, str) and started.isprintable() and len(started) <= 40:
        text += f", started {started}"
    return text
