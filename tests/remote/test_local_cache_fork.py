"""A process forked while another thread opens a shard's lock never keeps that lock (DataLoader workers are forked
while the prefetcher downloads): a copy the child kept would hold the parent's flock after the parent died."""

from __future__ import annotations

import fcntl
import os
import threading
import time
from pathlib import Path

import pytest

import shardstore.remote.local_cache as local_cache
from tests.remote.test_local_cache import FakeStore, open_cache


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_child_forked_while_a_lock_is_being_opened_closes_its_copy(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    cache = open_cache(tmp_path / "node", FakeStore(tmp_path / "objects"))
    opened, release = threading.Event(), threading.Event()
    real_open = os.open
    fds: list[int] = []

    def slow_open(path, flags, mode=0o777, *args, **kwargs):
        fd = real_open(path, flags, mode, *args, **kwargs)
        if str(path).endswith("shard_000001.lock"):
            fds.append(fd)
            opened.set()
            release.wait(5)  # the window between opening a descriptor and registering it
        return fd

    monkeypatch.setattr(local_cache.os, "open", slow_open)
    held: list[int] = []
    opener = threading.Thread(target=lambda: held.append(cache._open_lock("shard_000001", None, create=True)))
    opener.start()
    assert opened.wait(5)
    threading.Timer(0.2, release.set).start()  # the fork below waits for the registration, then goes on
    pid = os.fork()
    if pid == 0:  # the child: its copy of the descriptor must be closed
        try:
            os.fstat(fds[0])
            os._exit(1)
        except OSError:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    opener.join(5)
    assert os.waitstatus_to_exitcode(status) == 0, "the child kept a copy of a lock descriptor opened at the fork"
    fcntl.flock(held[0], fcntl.LOCK_EX | fcntl.LOCK_NB)  # the parent's own descriptor is still good
    cache._close_lock(held[0])


def test_the_fork_hooks_hold_no_guard_after_the_fork(tmp_path: Path) -> None:
    cache = open_cache(tmp_path / "node", FakeStore(tmp_path / "objects"))
    local_cache._before_fork()
    assert not cache._fd_guard.acquire(blocking=False)  # held across the fork
    local_cache._after_fork_in_parent()
    assert cache._fd_guard.acquire(timeout=1)
    cache._fd_guard.release()
    started = time.monotonic()
    fd = cache._open_lock("shard_000002", None, create=True)
    assert fd is not None and time.monotonic() - started < 1
    cache._close_lock(fd)
