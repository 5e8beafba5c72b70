"""``NodeGate``: at most ``limit`` object-store requests in flight at once across every process of a node.

Eight ranks on a node each reading with 16 threads would otherwise open 128 connections to one bucket
prefix and draw 503 SlowDown; the gate caps the node, not the process.

How: ``limit`` slot files ``directory/slot-<i>.lock``; a request holds one for its duration with
``flock(LOCK_EX | LOCK_NB)``. The kernel drops a flock when the last descriptor of its open file goes
away, so a process that dies (even by SIGKILL) frees its slot without anyone cleaning up, and the lock
files are never unlinked (unlinking would let two processes lock two different inodes of one name).
When every slot is taken the caller polls every ``POLL_S``. Within a process a ``threading.Semaphore``
admits at most ``limit`` threads to that loop, so threads wait on the semaphore instead of spinning.

Each acquisition opens its slot file afresh (``O_CLOEXEC``): flock locks belong to an open file
description, and two threads sharing one descriptor would both "hold" the slot. After ``fork()`` the
child closes its copies of the parent's held descriptors (closing a copy never unlocks the parent's
slot: only ``LOCK_UN`` or closing the last copy does) and starts with a fresh semaphore, so a child
never holds, nor waits for, what its parent's threads held.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import random
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

from shardstore.errors import ConfigError, ShardstoreError

#: Sleep between two sweeps over the slot files when all are busy: short next to a ranged GET (~10-50 ms
#: to a bucket), long enough that a waiting thread costs nothing measurable.
POLL_S = 0.005

_gates: weakref.WeakSet[NodeGate] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for gate in list(_gates):
        gate._forget_parent()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class NodeGate:
    """A cap of ``limit`` concurrent requests shared by every process that uses the same ``directory``.

    ``directory`` None caps only this process's threads. The gate is picklable (a worker that unpickles it
    shares the node's slots) and fork-safe; ``with gate.slot(): ...`` wraps one request.
    """

    def __init__(self, directory: str | os.PathLike[str] | None, limit: int) -> None:
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise ConfigError(f"the node's request limit must be a whole number >= 1, got {limit!r}")
        self.directory = None if directory is None else Path(directory)
        self.limit = limit
        self._setup()
        _gates.add(self)

    def _setup(self) -> None:
        self._pid = os.getpid()
        self._semaphore = threading.Semaphore(self.limit)
        self._lock = threading.Lock()
        self._held: set[int] = set()       # descriptors of the slots this process's threads hold now
        self._made_directory = False

    def _forget_parent(self) -> None:
        """In a forked child: drop the parent's held descriptors (their locks stay the parent's) and start anew."""
        for fd in self._held:
            with contextlib.suppress(OSError):
                os.close(fd)  # a plain close: LOCK_UN here would release the parent's slot
        self._setup()

    def __getstate__(self) -> dict[str, object]:
        return {"directory": self.directory, "limit": self.limit}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.directory = state["directory"]  # type: ignore[assignment]
        self.limit = state["limit"]  # type: ignore[assignment]
        self._setup()
        _gates.add(self)

    def __repr__(self) -> str:
        return f"NodeGate({str(self.directory) if self.directory else None!r}, limit={self.limit})"

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one of the node's ``limit`` slots for the body of the ``with``; waits while all are taken."""
        if self._pid != os.getpid():  # forked without the at-fork hook (or before it ran)
            self._forget_parent()
        semaphore, pid = self._semaphore, self._pid
        semaphore.acquire()
        try:
            fd = None if self.directory is None else self._take_slot_file()
            try:
                yield
            finally:
                if fd is not None:
                    self._give_back(fd, pid)
        finally:
            if pid == os.getpid():
                semaphore.release()

    def _slot_path(self, index: int) -> Path:
        assert self.directory is not None
        return self.directory / f"slot-{index}.lock"

    def _open_slot(self, index: int) -> int:
        path = self._slot_path(index)
        if not self._made_directory:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)  # type: ignore[union-attr]
            except OSError as error:
                raise ShardstoreError(f"cannot create the request gate's directory {self.directory}: "
                                      f"{error.strerror}; set a writable directory for it") from error
            self._made_directory = True
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as error:
            raise ShardstoreError(f"cannot open the request gate's slot file {path}: {error.strerror}; "
                                  f"every process of the node must be able to write {self.directory}") from error

    def _take_slot_file(self) -> int:
        """The descriptor of a slot file this thread now holds locked; polls while all are busy."""
        start = random.randrange(self.limit)  # spread waiters over the slots instead of all trying slot 0 first
        while True:
            for step in range(self.limit):
                fd = self._open_slot((start + step) % self.limit)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as error:
                    os.close(fd)
                    if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        raise
                    continue
                with self._lock:
                    self._held.add(fd)
                return fd
            time.sleep(POLL_S)

    def _give_back(self, fd: int, pid: int) -> None:
        if pid != os.getpid():
            return  # taken by the parent before a fork: the child closed its copy already, the slot is the parent's
        with self._lock:
            self._held.discard(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)  # explicit: a forked child could still hold a copy of fd
        finally:
            os.close(fd)
