"""The node-local shard cache: each remote shard file is downloaded once per node into a directory kept under a limit.

Layout of ``directory``::

    <key>                          final files, where the ordinary reader maps them (keys are '/'-separated)
    .shardstore/space.lock         held (flock LOCK_EX) while anyone measures, reserves, evicts or commits
    .shardstore/locks/<name>.lock  a shard's lock: LOCK_EX to download or evict it, LOCK_SH to pin it; never unlinked
    .shardstore/tmp/<tag>.<file>.<pid>.<hex>.part   a download in progress (and its ``~reserve`` placeholder)
    .shardstore/fetched/<name>     the receipt: the cache downloaded these keys of the shard and may delete them

The contract:

* A file under its final name is complete: it is written under a temporary name, its size and SHA-256 checked,
  fsynced, then renamed. A killed download leaves only temporaries, which whoever takes the shard's lock next
  (or ``clean``) removes; the kernel drops a dead process's flocks, so a waiter takes over within a poll.
* The directory never holds more than ``limit`` bytes, counted as ``du`` counts them (allocated blocks of every
  file and directory under it). Every allocation the cache makes happens under ``space.lock`` after a scan showed
  room for it: temporaries are ``posix_fallocate``d to full size while the lock is held, and what a commit will
  add later (the receipt, directories, directory blocks) is held meanwhile by a placeholder file that the commit
  removes under the same lock. Directories never shrink, so their growth is over-estimated, never under.
* Only shards with a receipt are evicted, files first and the receipt last (a killed eviction leaves a receipt
  naming what is left, which is evicted later; the other order would leave files no one may delete). A file the
  cache did not download is never deleted. Pinned shards (LOCK_SH held) and ``protected()`` ones are kept.
* A process must not download a shard it has pinned itself (its own LOCK_SH would block its LOCK_EX): pin only
  what is present. ``ensure(..., pin=True)`` pins and checks presence in one step, which also closes the gap in
  which an eviction could strike between a separate ``ensure`` and ``pin``.
* Opening a cache creates the bookkeeping directories outside any reservation (a few blocks, once). The
  directory must be node-local: flocks there belong to an open file, which NFS does not honour (its locks are
  per process, so a process's own pins would not stop its own evictions).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import secrets
import stat
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from shardstore.errors import ConfigError, CorruptShardError, DiskFullError, ManifestError
from shardstore.remote.gate import NodeGate
from shardstore.remote.objects import (
    ObjectChanged,
    ObjectClient,
    ObjectInfo,
    ObjectNotFound,
    RemoteError,
    TransientRemoteError,
)
from shardstore.remote.retry import RetryPolicy, call_with_retries

T = TypeVar("T")

BOOKKEEPING = ".shardstore"
BLOCK = 4096
MIN_PART = 1 << 20  # the smallest ranged GET a file is split into
MIB = 1 << 20
#: How often a process waiting for another's download tries the shard's lock: a dead holder is noticed this fast.
POLL_S = 0.015
_SPACE_POLL_S = 0.003          # space.lock is held for a scan and a few file operations at a time
_SPACE_RETRY_S = 0.05          # wait between two reservations that found no room
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=@-]{0,63}\Z")
_SHA256 = re.compile(r"sha256:[0-9a-f]{64}\Z")


# -- what a shard is ---------------------------------------------------------------------------------


def check_key(key: str) -> None:
    """Refuse a key that would land outside the cache directory or over its bookkeeping."""
    parts = key.split("/") if isinstance(key, str) else [""]
    if "\0" in parts[0] or any(p in ("", ".", "..") or "\0" in p for p in parts) or parts[0] == BOOKKEEPING:
        raise ManifestError(f"object key {key!r} would be stored outside the local cache or over its {BOOKKEEPING}/ "
                            "(keys are relative and '/'-separated, without empty, '.' or '..' parts); "
                            "rebuild the manifest from a store you trust")


def check_name(name: str) -> None:
    """Refuse a shard name that cannot name a lock file and a receipt."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ManifestError(f"shard name {name!r:.80} cannot name a lock file (1-64 of A-Z a-z 0-9 _ . + = @ -, "
                            "not starting with '.' or '-'); name shards like shard_000042")


class NoRoom(RemoteError):
    """Nothing is wrong with the shard, but it could not be fetched in time: the cache was full of shards in use,
    or another process was still downloading it. A prefetcher tries again later; a reader gives up."""


@dataclass(frozen=True)
class RemoteFile:
    """One object of a shard: its key under the store's root, its size, and its ``"sha256:<hex>"`` if recorded."""

    key: str
    size: int
    sha256: str | None = None

    def __post_init__(self) -> None:
        check_key(self.key)
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 0:
            raise ManifestError(f"{self.key}: size {self.size!r} is not a byte count; rebuild the manifest")
        if self.sha256 is not None and not _SHA256.match(self.sha256):
            raise ManifestError(f"{self.key}: checksum {self.sha256!r:.80} is not 'sha256:<64 hex digits>'; "
                                "rebuild the manifest")


@dataclass(frozen=True)
class ShardFiles:
    """A shard's files: fetched, pinned and evicted together under ``name`` (e.g. ``shard_000042``)."""

    name: str
    files: tuple[RemoteFile, ...]

    def __post_init__(self) -> None:
        check_name(self.name)
        keys = [f.key for f in self.files]
        if len(set(keys)) != len(keys):
            dup = next(k for k in keys if keys.count(k) > 1)
            raise ManifestError(f"shard {self.name} lists {dup} twice; rebuild the manifest")


@dataclass(frozen=True)
class CacheStats:
    """What this process's cache did since it was opened (or since the fork that made this process)."""

    bytes_downloaded: int = 0
    files_downloaded: int = 0
    shards_downloaded: int = 0
    requests: int = 0            # HEADs and ranged GETs, every attempt
    retries: int = 0
    download_s: float = 0.0      # wall time spent downloading shards
    wait_s: float = 0.0          # wall time spent waiting for other processes (their downloads, room in the cache)
    evictions: int = 0           # shards this process evicted
    usage_bytes: int = 0         # the directory's size at the last measurement


class _Counters:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.values = CacheStats().__dict__.copy()

    def add(self, **amounts: float) -> None:
        with self.lock:
            for name, amount in amounts.items():
                self.values[name] += amount

    def set(self, name: str, value: float) -> None:
        with self.lock:
            self.values[name] = value


# -- sizes -------------------------------------------------------------------------------------------


def disk_usage(directory: str | os.PathLike[str], *, empty: Collection[str] = ()) -> int:
    """Bytes allocated to ``directory`` and everything under it, as ``du -s -B1`` counts them (hard links once).

    Directories in ``empty`` hold only empty files (0 blocks): their own blocks count, their entries are not
    visited. The cache's ``locks/`` is one: a lock file is never written nor unlinked, so that directory
    names every shard the node ever fetched, and stat-ing them all would make every scan slower.
    """
    total, seen, stack = 0, set(), [os.fspath(directory)]
    try:
        total = os.lstat(stack[0]).st_blocks * 512
    except FileNotFoundError:
        return 0
    while stack:
        try:
            entries = os.scandir(stack.pop())
        except (FileNotFoundError, NotADirectoryError):
            continue  # removed while we walked
        with entries:
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                    if (st.st_dev, st.st_ino) in seen:
                        continue
                    seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
                if stat.S_ISDIR(st.st_mode) and entry.path not in empty:
                    stack.append(entry.path)
    return total


def _allocated(size: int) -> int:
    """Blocks ``posix_fallocate`` takes for ``size`` bytes: whole blocks, plus ext4 extent-tree blocks for large
    files."""
    extra = BLOCK * math.ceil((size - (1 << 29)) / (340 << 27)) if size > 1 << 29 else 0
    return -(-size // BLOCK) * BLOCK + extra


def _dir_growth(entries: int) -> int:
    """The most a directory can grow by when ``entries`` names are added to it (ext4: turning a one-block
    directory into an indexed one adds two blocks; after that a leaf split adds one per ~7 long names)."""
    return BLOCK * (2 + (entries - 1) // 7) if entries > 0 else 0


def _tag(name: str) -> str:
    """``name`` without dots, so a temporary's name splits at its first dot into shard and the rest."""
    return name.replace("%", "%25").replace(".", "%2E")


def _untag(tag: str) -> str:
    return tag.replace("%2E", ".").replace("%25", "%")


def _unlink(path: str) -> int:
    """Remove a file; the bytes that frees as ``du`` counts them (0 if it was gone or has other links)."""
    try:
        st = os.lstat(path)
        os.unlink(path)
    except FileNotFoundError:
        return 0
    return st.st_blocks * 512 if st.st_nlink == 1 else 0


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256_of(fd: int) -> str:
    digest, buf, offset = hashlib.sha256(), bytearray(MIB), 0
    view = memoryview(buf)
    while n := os.preadv(fd, [view], offset):
        digest.update(view[:n])
        offset += n
    return "sha256:" + digest.hexdigest()


def _try_flock(fd: int, operation: int) -> bool:
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


class _Aborted(Exception):
    """Another part of the same download failed: stop this one without retrying."""


@dataclass
class _Download:
    file: RemoteFile
    path: str                   # final name
    temp: str
    fd: int = -1
    info: ObjectInfo | None = None
    changed: bool = False       # a part saw ObjectChanged: the other parts of this file stop


_caches: weakref.WeakSet[LocalCache] = weakref.WeakSet()


_forking: list[threading.Lock] = []  # the descriptor locks the forking thread holds across a fork


def _before_fork() -> None:
    """No lock descriptor is half-registered while the process forks: a child must know every one to close it
    (a copy it kept would hold the parent's flock after the parent died, until the child exits)."""
    for cache in list(_caches):
        guard = getattr(cache, "_fd_guard", None)
        if guard is not None and guard.acquire(timeout=5):
            _forking.append(guard)


def _after_fork_in_parent() -> None:
    while _forking:
        _forking.pop().release()


def _after_fork_in_child() -> None:
    _forking.clear()  # the child's copies of those locks are replaced by _forget_parent
    for cache in list(_caches):
        cache._forget_parent()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child)


class LocalCache:
    """Shard files of an object store, fetched on demand into ``directory`` and kept under ``limit`` bytes.

    One instance per process; every process of a node that uses the same ``directory`` cooperates through
    flocks (see the module docstring). ``next_use(name)`` says when a shard is next needed (``inf``: never;
    larger is evicted first); without it the least recently used receipt goes first. ``protected()`` names
    shards this process's plan still needs. ``space_timeout`` bounds how long a download waits for room when
    ``ensure`` has no timeout. Picklable (directory, limit, client and settings; the callbacks stay behind) and
    fork-safe: a child closes its copies of the parent's lock descriptors and makes its own thread pool.
    """

    def __init__(self, directory: str | os.PathLike[str], limit: int, client: ObjectClient, *,
                 part_size: int = 8 * MIB, parallel_parts: int = 4, policy: RetryPolicy | None = None,
                 gate: NodeGate | None = None, next_use: Callable[[str], float] | None = None,
                 protected: Callable[[], Collection[str]] | None = None, space_timeout: float = 120.0) -> None:
        for what, value, low in (("cache_limit", limit, 1), ("part_size", part_size, 1),
                                 ("parallel_parts", parallel_parts, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"{what} must be a whole number >= {low}, got {value!r}")
        self.directory = Path(directory)
        self.limit = limit
        self.client = client
        self.part_size = part_size
        self.parallel_parts = parallel_parts
        self.policy = policy
        self.gate = gate
        self.space_timeout = float(space_timeout)
        self.next_use = next_use
        self.protected = protected
        self._setup()
        self._remove_dead_temporaries()  # the cheap half of clean(): every DataLoader worker opens a cache

    def _setup(self) -> None:
        """Paths and per-process state (made again after unpickling and, lazily, after a fork)."""
        root = os.fspath(self.directory)
        book = os.path.join(root, BOOKKEEPING)
        self._root, self._tmp = root, os.path.join(book, "tmp")
        self._locks, self._fetched = os.path.join(book, "locks"), os.path.join(book, "fetched")
        self._space = os.path.join(book, "space.lock")
        try:
            for path in (self._locks, self._tmp, self._fetched):
                os.makedirs(path, exist_ok=True)
            os.close(os.open(self._space, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644))
        except OSError as error:
            raise ConfigError(f"local cache {root} cannot be set up ({error.strerror or error}); "
                              "pass a writable node-local directory") from None
        self._real = os.path.realpath(root)
        self._forget_parent()
        _caches.add(self)

    def _forget_parent(self) -> None:
        """Start this process's state afresh; in a forked child, close (never unlock) the parent's descriptors."""
        for fd in getattr(self, "_fds", ()):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._pid = os.getpid()
        self._mutex = threading.Lock()
        self._fd_guard = threading.Lock()           # held while a lock descriptor is opened and registered
        self._fds: set[int] = set()                 # every lock descriptor this process has open
        self._pins: dict[str, list[int]] = {}       # name -> [descriptor holding LOCK_SH, count]
        self._pool: ThreadPoolExecutor | None = None
        self._counters = _Counters()

    def _check_fork(self) -> None:
        if self._pid != os.getpid():  # forked without the at-fork hook having run
            self._forget_parent()

    def __getstate__(self) -> dict[str, object]:
        return {"directory": self.directory, "limit": self.limit, "client": self.client,
                "part_size": self.part_size, "parallel_parts": self.parallel_parts, "policy": self.policy,
                "gate": self.gate, "space_timeout": self.space_timeout}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self.next_use = self.protected = None
        self._setup()

    def __repr__(self) -> str:
        return f"LocalCache({self._root!r}, limit={self.limit:,}, client={getattr(self.client, 'url', '?')!r})"

    def close(self) -> None:
        """Release every pin and stop the download threads (the cache's files stay)."""
        with self._mutex:
            pins, self._pins = list(self._pins.values()), {}
            pool, self._pool = self._pool, None
        for fd, _ in pins:
            self._close_lock(fd)
        if pool is not None and self._pid == os.getpid():
            pool.shutdown(wait=True)

    @property
    def stats(self) -> CacheStats:
        """A snapshot of this process's counters."""
        with self._counters.lock:
            return CacheStats(**self._counters.values)

    @property
    def pinned(self) -> frozenset[str]:
        """Shards this process pins now."""
        with self._mutex:
            return frozenset(self._pins)

    # -- paths and locks ----------------------------------------------------------------------------

    def path(self, key: str) -> str:
        """Where ``key``'s final file lives (checked against symlinks leading out of the directory)."""
        check_key(key)
        path = os.path.join(self._root, *key.split("/"))
        if not os.path.realpath(path).startswith(self._real + os.sep):
            raise ManifestError(f"object key {key!r} resolves outside the local cache {self._root} (a symlink on "
                                "the way?); remove the link or use another local_cache directory")
        return path

    def _lock_path(self, name: str) -> str:
        return os.path.join(self._locks, name + ".lock")

    def _receipt_path(self, name: str) -> str:
        return os.path.join(self._fetched, name)

    def _open_lock(self, name: str, deadline: float | None, *, create: bool) -> int | None:
        """A new descriptor of ``name``'s lock file (flocks belong to it alone); None if absent and not ``create``."""
        path = self._lock_path(name)
        try:
            return self._open_tracked(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            if not create:
                return None
            # A new name in locks/ can grow that directory: created under space.lock like every allocation.
            return self._reserve(name, _dir_growth(1), deadline,
                                 lambda: self._open_tracked(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC))

    def _open_tracked(self, path: str, flags: int) -> int:
        """Open a lock file and register the descriptor, with no fork in between (see ``_before_fork``)."""
        with self._fd_guard:
            fd = os.open(path, flags, 0o644)
            with self._mutex:
                self._fds.add(fd)
        return fd

    def _close_lock(self, fd: int) -> None:
        with self._mutex:
            if fd not in self._fds:
                return
            self._fds.discard(fd)
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)  # explicit: a child forked meanwhile may still hold a copy of fd
        os.close(fd)

    def _wait_lock(self, fd: int, operation: int, deadline: float | None, what: str) -> float:
        """Poll ``flock(operation | LOCK_NB)`` until it succeeds; the seconds waited."""
        start = time.monotonic()
        while not _try_flock(fd, operation):
            if deadline is not None and time.monotonic() >= deadline:
                raise RemoteError(f"timed out after {time.monotonic() - start:.1f} s waiting for {what}; "
                                  "raise the timeout, or find the process of this node that holds it")
            time.sleep(POLL_S)
        return time.monotonic() - start

    @contextlib.contextmanager
    def _space_locked(self, deadline: float | None) -> Iterator[None]:
        fd = self._open_tracked(self._space, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC)
        try:
            while not _try_flock(fd, fcntl.LOCK_EX):
                if deadline is not None and time.monotonic() >= deadline:
                    raise RemoteError(f"timed out waiting for {self._space}; raise the timeout, or find the "
                                      "process of this node that holds it")
                time.sleep(_SPACE_POLL_S)
            yield
        finally:
            self._close_lock(fd)

    # -- ensure -------------------------------------------------------------------------------------

    def ensure(self, shard: ShardFiles, *, may_download: bool = True, timeout: float | None = None,
               pin: bool = False, give_up: Callable[[], str | None] | None = None) -> float:
        """Make every file of ``shard`` present and complete under its final name; return the seconds it took.

        Present files cost one ``stat`` each. Otherwise the shard is downloaded here, or, if another process
        of the node is downloading it, this waits for that (and takes over if it dies). ``may_download=False``
        (a DataLoader worker) only waits for someone else to bring it; ``give_up()`` is then asked at every
        poll, and a message it returns (the process that was to fetch the shard failed, or is gone) ends the
        wait with a ``RemoteError`` saying it. ``timeout`` bounds the whole call; None waits as long as it
        takes (room in the cache: at most ``space_timeout``). With ``pin=True`` the shard is also pinned,
        atomically with the presence check; ``unpin`` it when done.
        """
        self._check_fork()
        start = time.monotonic()
        paths = [os.path.join(self._root, *f.key.split("/")) for f in shard.files]
        if self._present(shard, paths) and (not pin or self._pin_if_present(shard, paths)):
            return 0.0
        deadline = None if timeout is None else start + timeout
        while True:
            if may_download:
                self._fetch(shard, paths, deadline)
            else:
                self._wait_for_others(shard, paths, deadline, start, give_up)
            if not pin or self._pin_if_present(shard, paths):
                return time.monotonic() - start

    def _present(self, shard: ShardFiles, paths: list[str]) -> bool:
        for f, path in zip(shard.files, paths):
            try:
                if os.stat(path).st_size != f.size:
                    return False
            except (FileNotFoundError, NotADirectoryError):
                return False
        return True

    def _pin_if_present(self, shard: ShardFiles, paths: list[str]) -> bool:
        self.pin(shard.name)
        if self._present(shard, paths):
            return True
        self.unpin(shard.name)  # evicted between the check and the pin: fetch again
        return False

    def _wait_for_others(self, shard: ShardFiles, paths: list[str], deadline: float | None, start: float,
                         give_up: Callable[[], str | None] | None = None) -> None:
        """Poll until the files are present; at the deadline say whether anyone was fetching them."""
        t0 = time.monotonic()
        try:
            while not self._present(shard, paths):
                reason = give_up() if give_up is not None else None
                if reason is not None:
                    raise RemoteError(reason)
                if deadline is not None and time.monotonic() >= deadline:
                    if self._lock_busy(shard.name):
                        raise RemoteError(f"shard {shard.name} is still being downloaded by another process of "
                                          f"this node after {time.monotonic() - start:.1f} s; raise the timeout")
                    raise RemoteError(f"shard {shard.name} was never fetched by this rank's prefetcher (waited "
                                      f"{time.monotonic() - start:.1f} s, nobody is downloading it); a DataLoader "
                                      "worker never downloads: keep the prefetcher running ahead of the workers")
                time.sleep(POLL_S)
        finally:
            self._counters.add(wait_s=time.monotonic() - t0)

    def _lock_busy(self, name: str) -> bool:
        """True if some process holds ``name``'s lock exclusively (downloading or evicting it)."""
        fd = self._open_lock(name, None, create=False)
        if fd is None:
            return False
        try:
            return not _try_flock(fd, fcntl.LOCK_SH)
        finally:
            self._close_lock(fd)

    def _fetch(self, shard: ShardFiles, paths: list[str], deadline: float | None) -> None:
        """Under the shard's exclusive lock: whatever is still missing, downloaded."""
        if shard.name in self.pinned:
            raise RemoteError(f"shard {shard.name} is pinned by this process but a file of it is missing or has "
                              "the wrong size (changed outside the cache?); unpin it before it can be fetched again")
        fd = self._open_lock(shard.name, deadline, create=True)
        assert fd is not None
        try:
            # Another thread or process may bring the shard meanwhile, and pin it as soon as it is there
            # (a shared lock this exclusive one would wait on for ever): present files end the wait.
            start = time.monotonic()
            while not _try_flock(fd, fcntl.LOCK_EX):
                if self._present(shard, paths):
                    self._counters.add(wait_s=time.monotonic() - start)
                    return
                if deadline is not None and time.monotonic() >= deadline:
                    raise NoRoom(f"timed out after {time.monotonic() - start:.1f} s waiting for another "
                                      f"process of this node to finish downloading shard {shard.name}; raise the "
                                      "timeout, or find the process of this node that holds it")
                time.sleep(POLL_S)
            self._counters.add(wait_s=time.monotonic() - start)
            missing = self._missing(shard, paths)
            if missing:
                t0 = time.monotonic()
                self._remove_temporaries(shard.name)  # we hold the lock: whoever left them is dead
                self._download(shard, missing, deadline)
                self._counters.add(download_s=time.monotonic() - t0)
        finally:
            self._close_lock(fd)

    def _missing(self, shard: ShardFiles, paths: list[str]) -> list[tuple[RemoteFile, str]]:
        """Files to download; a wrong-sized file the cache did not download is refused, not replaced."""
        owned: dict[str, object] | None = None
        out = []
        for f, path in zip(shard.files, paths):
            try:
                size = os.stat(path).st_size
            except (FileNotFoundError, NotADirectoryError):
                out.append((f, path))
                continue
            if size == f.size:
                continue
            owned = self._read_receipt(shard.name) if owned is None else owned
            if f.key not in owned:
                raise CorruptShardError(f"{path} is {size:,} bytes but the manifest says {f.size:,}; the cache did "
                                        "not download it, so it is left alone: remove it or rebuild the manifest")
            out.append((f, path))
        return out

    # -- downloading --------------------------------------------------------------------------------

    def _download(self, shard: ShardFiles, missing: list[tuple[RemoteFile, str]], deadline: float | None) -> None:
        pid = os.getpid()
        jobs = [_Download(f, self.path(f.key), os.path.join(
            self._tmp, f"{_tag(shard.name)}.{f.key.rsplit('/', 1)[-1][:80]}.{pid}.{secrets.token_hex(4)}.part"))
            for f, _ in missing]
        # Sizes checked before any room is made for them; a shard's files are asked about at once.
        heads = [self._executor().submit(self._head, shard, job.file) for job in jobs] if len(jobs) > 1 else []
        for i, job in enumerate(jobs):
            job.info = heads[i].result() if heads else self._head(shard, job.file)
        placeholder = os.path.join(self._tmp, f"{_tag(shard.name)}.~reserve.{pid}.{secrets.token_hex(4)}.part")
        try:
            self._reserve_download(shard, jobs, placeholder, deadline)
            self._get_all(shard, jobs)
            for job in jobs:
                self._verify(job)
                os.fsync(job.fd)
            self._commit(shard, jobs, placeholder)
        finally:
            for job in jobs:
                if job.fd >= 0:
                    os.close(job.fd)
                _unlink(job.temp)  # gone already after a commit
            _unlink(placeholder)

    def _slot(self) -> contextlib.AbstractContextManager[object]:
        return self.gate.slot() if self.gate is not None else contextlib.nullcontext()

    def _retry(self, fn: Callable[[], T], what: str) -> T:
        return call_with_retries(fn, what=what, policy=self.policy,
                                 on_retry=lambda failures, error: self._counters.add(retries=1))

    def _head(self, shard: ShardFiles, f: RemoteFile) -> ObjectInfo:
        url = f"{self.client.url}/{f.key}"

        def once() -> ObjectInfo:
            with self._slot():
                self._counters.add(requests=1)
                return self.client.head(f.key)

        try:
            info = self._retry(once, f"HEAD {url}")
        except ObjectNotFound:
            raise ObjectNotFound(f"{url} (shard {shard.name}) is not in the store; rebuild the manifest") from None
        if info.size != f.size:
            raise CorruptShardError(f"{url} is {info.size:,} bytes in the store but the manifest says {f.size:,} "
                                    "(the store changed since the manifest was built); rebuild the manifest")
        return info

    def _get_all(self, shard: ShardFiles, jobs: list[_Download]) -> None:
        """Every part of every file; a file replaced mid-read starts over once from a fresh HEAD."""
        pending = jobs
        for attempt in range(2):
            changed = self._get_parts(pending)
            if not changed:
                return
            if attempt == 1:
                job = changed[0]
                raise RemoteError(f"{self.client.url}/{job.file.key} was replaced twice while it was being "
                                  "downloaded; stop whatever rewrites the store's objects while they are read, "
                                  "then rebuild the manifest")
            for job in changed:
                job.info, job.changed = self._head(shard, job.file), False
            pending = changed

    def _executor(self) -> ThreadPoolExecutor:
        with self._mutex:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.parallel_parts, thread_name_prefix="shardstore-fetch")
            return self._pool

    def _get_parts(self, jobs: list[_Download]) -> list[_Download]:
        """Fetch the parts of ``jobs`` on the pool; the jobs whose object changed. All parts end before it returns."""
        abort = threading.Event()
        pool = self._executor()
        futures: list[Future[None]] = [
            pool.submit(self._get_part, job, start, min(start + part, job.file.size), abort)
            for job in jobs for part in [self._part_of(job.file.size)]
            for start in range(0, job.file.size, part)]
        first: BaseException | None = None
        for future in futures:  # every one waited for: no part may write after the temporaries are closed
            try:
                future.result()
            except (ObjectChanged, _Aborted):
                pass  # a replaced object's job is marked; its other parts stop early
            except BaseException as error:  # noqa: BLE001 - KeyboardInterrupt too: the rest stop, then it is raised
                abort.set()
                first = first or error
        if first is not None:
            raise first
        return [job for job in jobs if job.changed]

    def _part_of(self, size: int) -> int:
        """Part size for a file of ``size`` bytes: ``part_size``, or less so a file of a few parts keeps the
        parallel GETs busy (never under 1 MiB: a request costs a round trip)."""
        return max(min(MIN_PART, self.part_size), min(self.part_size, -(-size // self.parallel_parts)))

    def _get_part(self, job: _Download, start: int, end: int, abort: threading.Event) -> None:
        key = job.file.key
        what = f"GET {self.client.url}/{key} [{start}, {end})"

        def once() -> bytes:
            if abort.is_set() or job.changed:
                raise _Aborted
            with self._slot():
                self._counters.add(requests=1)
                # A view of the client's buffer where it offers one (no copy into bytes).
                get = getattr(self.client, "get_range_view", self.client.get_range)
                data = get(key, start, end, if_match=job.info.etag if job.info else None)
            self._counters.add(bytes_downloaded=len(data))
            if len(data) != end - start:
                raise TransientRemoteError(f"{what}: {len(data):,} of {end - start:,} bytes came back (truncated)")
            return data

        try:
            data = self._retry(once, what)
        except ObjectChanged:
            job.changed = True
            raise
        view, offset = memoryview(data), start
        while view:
            n = os.pwrite(job.fd, view, offset)
            view, offset = view[n:], offset + n

    def _verify(self, job: _Download) -> None:
        url = f"{self.client.url}/{job.file.key}"
        size = os.fstat(job.fd).st_size
        if size != job.file.size:
            raise CorruptShardError(f"{url}: downloaded {size:,} bytes, the manifest says {job.file.size:,}; "
                                    "rebuild the manifest")
        if job.file.sha256 is not None:
            got = _sha256_of(job.fd)
            if got != job.file.sha256:
                raise CorruptShardError(f"{url}: SHA-256 of the downloaded bytes is {got[:23]}…, the manifest says "
                                        f"{job.file.sha256[:23]}… (the object changed after the manifest was built, "
                                        "or the store returned bad bytes); rebuild the manifest")

    # -- space --------------------------------------------------------------------------------------

    def _receipt_bytes(self, jobs: list[_Download]) -> int:
        return _allocated(200 + sum(len(job.file.key) + 200 for job in jobs))

    def _reserve_download(self, shard: ShardFiles, jobs: list[_Download], placeholder: str,
                          deadline: float | None) -> None:
        """Room for ``jobs``: their temporaries fallocated, and ``placeholder`` for what the commit adds."""
        entries: Counter[str] = Counter({self._fetched: 2})  # the receipt's temporary and its final name
        ancestors: set[str] = set()
        for job in jobs:
            parent = os.path.dirname(job.path)
            entries[parent] += 1
            while parent != self._root and parent not in ancestors:  # each may be created (or re-created)
                ancestors.add(parent)
                entries[os.path.dirname(parent)] += 1
                parent = os.path.dirname(parent)
        later = 2 * self._receipt_bytes(jobs) + BLOCK * len(ancestors) + sum(map(_dir_growth, entries.values()))
        temps = sum(_allocated(job.file.size) for job in jobs)
        need = temps + later + _dir_growth(len(jobs) + 1)  # tmp/ gains the temporaries and the placeholder

        def allocate() -> None:
            for job in [*jobs, None]:
                path, size = (placeholder, later) if job is None else (job.temp, job.file.size)
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
                if job is None:
                    try:
                        self._fallocate(fd, size, path, need)
                    finally:
                        os.close(fd)
                else:
                    job.fd = fd
                    self._fallocate(fd, size, path, need)

        self._reserve(shard.name, need, deadline, allocate)

    def _fallocate(self, fd: int, size: int, path: str, need: int) -> None:
        if size == 0:
            return
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFullError(f"no space left on device: reserving {need:,} bytes in {self._root} for "
                                    f"{path}; free space on that file system or lower cache_limit") from None
            raise

    def _reserve(self, name: str, need: int, deadline: float | None, allocate: Callable[[], T]) -> T:
        """Evict until ``need`` more bytes fit under the limit, then ``allocate()`` before anyone else measures."""
        if need > self.limit:
            raise RemoteError(f"cache_limit {self.limit:,} bytes is too small: shard {name} alone needs {need:,} "
                              "bytes; raise cache_limit")
        start = time.monotonic()
        give_up = start + self.space_timeout if deadline is None else deadline
        tries = 0
        while True:
            tries += 1
            with self._space_locked(deadline):
                usage = disk_usage(self._root, empty=(self._locks,))
                short = usage + need - self.limit
                if short > 0:
                    freed = self._evict(short, name)
                    usage, short = usage - freed, short - freed
                self._counters.set("usage_bytes", usage)
                if short <= 0:
                    result = allocate()
                    if tries > 1:
                        self._counters.add(wait_s=time.monotonic() - start)
                    return result
            if time.monotonic() >= give_up:
                self._counters.add(wait_s=time.monotonic() - start)
                raise NoRoom(f"cache_limit {self.limit:,} bytes is too small: shard {name} needs {need:,} bytes "
                                  f"while {usage:,} are held by shards in use (pinned, protected, downloading, or "
                                  "not downloaded by the cache); raise cache_limit")
            time.sleep(_SPACE_RETRY_S)  # others' downloads end and their pins go: try again

    def _evict(self, short: int, exclude: str) -> int:
        """Under space.lock: free at least ``short`` bytes if possible; the bytes freed."""
        freed = self._remove_dead_temporaries()[1]
        if freed >= short:
            return freed
        keep = set(self.protected()) if self.protected is not None else set()
        keep |= self.pinned | {exclude}
        candidates = []
        with os.scandir(self._fetched) as entries:
            for entry in entries:
                if not entry.name.startswith(".") and entry.name not in keep:
                    with contextlib.suppress(FileNotFoundError):
                        candidates.append((entry.name, entry.stat().st_mtime))
        if self.next_use is not None:
            def order(c: tuple[str, float]) -> tuple[float, float]:
                use = float(self.next_use(c[0]))  # type: ignore[misc]
                return (-math.inf if math.isnan(use) else -use, c[1])
        else:
            def order(c: tuple[str, float]) -> tuple[float, float]:
                return (c[1], 0.0)
        for name, _ in sorted(candidates, key=order):
            if freed >= short:
                break
            fd = self._open_lock(name, None, create=False)
            # No lock file: nobody holds one, and nobody can create it while we hold space.lock.
            if fd is not None and not _try_flock(fd, fcntl.LOCK_EX):
                self._close_lock(fd)
                continue  # pinned, being downloaded or evicted by someone else
            try:
                freed += self._drop(name)
            finally:
                if fd is not None:
                    self._close_lock(fd)
        return freed

    def _drop(self, name: str) -> int:
        """Delete the files ``name``'s receipt lists, then the receipt, then emptied directories; bytes freed."""
        freed, parents = 0, set()
        for key in self._read_receipt(name):
            try:
                path = self.path(key)
            except ManifestError:
                continue
            freed += _unlink(path)
            parents.add(os.path.dirname(path))
        freed += _unlink(self._receipt_path(name))
        for parent in sorted(parents, key=len, reverse=True):
            while parent != self._root and parent.startswith(self._root + os.sep):
                try:
                    blocks = os.lstat(parent).st_blocks * 512
                    os.rmdir(parent)
                except OSError:
                    break  # not empty, or gone
                freed += blocks
                parent = os.path.dirname(parent)
        self._counters.add(evictions=1)
        return freed

    # -- commit and receipts ------------------------------------------------------------------------

    def _read_receipt(self, name: str) -> dict[str, object]:
        """The keys (with what was recorded about them) the cache downloaded for ``name``; {} without a receipt."""
        try:
            with open(self._receipt_path(name), "rb") as f:
                files = json.loads(f.read()).get("files", {})
        except (FileNotFoundError, ValueError, AttributeError):
            return {}
        return files if isinstance(files, dict) else {}

    def _commit(self, shard: ShardFiles, jobs: list[_Download], placeholder: str) -> None:
        """Swap the placeholder for the receipt, directories and final names, all under space.lock."""
        parents = sorted({os.path.dirname(job.path) for job in jobs})
        files = self._read_receipt(shard.name)
        for job in jobs:
            files[job.file.key] = {"size": job.file.size, "sha256": job.file.sha256,
                                   "etag": job.info.etag if job.info else None}
        text = json.dumps({"shard": shard.name, "files": files}, sort_keys=True).encode()
        temp = os.path.join(self._fetched, f".{_tag(shard.name)}.{os.getpid()}.{secrets.token_hex(4)}")
        with self._space_locked(None):
            _unlink(placeholder)
            for parent in parents:
                os.makedirs(parent, exist_ok=True)
            # The receipt goes first: if we die among the renames, what is in place is still the cache's to evict.
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                os.write(fd, text)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(temp, self._receipt_path(shard.name))
            for job in jobs:
                os.rename(job.temp, job.path)
        for parent in [*parents, self._fetched]:
            _fsync_dir(parent)
        self._counters.add(files_downloaded=len(jobs), shards_downloaded=1)

    # -- pins ---------------------------------------------------------------------------------------

    def pin(self, name: str) -> None:
        """Keep ``name`` from eviction (a shared lock on its lock file) until as many ``unpin`` calls.

        Pin only a present shard (see ``ensure(pin=True)``): this process could not download a shard it pins.
        """
        self._check_fork()
        check_name(name)
        with self._mutex:
            entry = self._pins.get(name)
            if entry is not None:
                entry[1] += 1
                return
        fd = self._open_lock(name, None, create=True)
        assert fd is not None
        try:
            self._wait_lock(fd, fcntl.LOCK_SH, None, f"shard {name}'s lock")
        except BaseException:
            self._close_lock(fd)
            raise
        with self._mutex:
            entry = self._pins.get(name)
            if entry is None:
                self._pins[name] = [fd, 1]
            else:
                entry[1] += 1
        if entry is not None:
            self._close_lock(fd)  # another thread pinned it meanwhile
        with contextlib.suppress(OSError):
            os.utime(self._receipt_path(name))  # least recently used goes first when there is no next_use

    def unpin(self, name: str) -> None:
        """Undo one ``pin``; the shard may be evicted once no process pins it."""
        self._check_fork()
        with self._mutex:
            entry = self._pins.get(name)
            if entry is None:
                raise ValueError(f"shard {name} is not pinned by this process")
            entry[1] -= 1
            if entry[1]:
                return
            del self._pins[name]
        self._close_lock(entry[0])

    # -- cleaning -----------------------------------------------------------------------------------

    def _remove_temporaries(self, name: str) -> tuple[int, int]:
        """Remove ``name``'s temporaries (downloads, placeholder, receipt); (files, bytes) removed."""
        tag, files, freed = _tag(name), 0, 0
        for directory, prefix in ((self._tmp, tag + "."), (self._fetched, "." + tag + ".")):
            with os.scandir(directory) as entries:
                for entry in entries:
                    if entry.name.startswith(prefix):
                        with contextlib.suppress(FileNotFoundError):
                            blocks = entry.stat(follow_symlinks=False).st_blocks * 512
                            os.unlink(entry.path)
                            files, freed = files + 1, freed + blocks
        return files, freed

    def _dead(self, names: set[str], action: Callable[[str], tuple[int, int]]) -> tuple[int, int]:
        """``action(name)`` for each shard whose lock can be taken now (its holder, if any, is gone); summed."""
        files = freed = 0
        for name in names:
            fd = self._open_lock(name, None, create=False) if _NAME.match(name) else None
            if fd is not None and not _try_flock(fd, fcntl.LOCK_EX):
                self._close_lock(fd)
                continue
            try:
                done = action(name)
                files, freed = files + done[0], freed + done[1]
            finally:
                if fd is not None:
                    self._close_lock(fd)
        return files, freed

    def _remove_dead_temporaries(self) -> tuple[int, int]:
        """Temporaries whose shard lock nobody holds: their writer died (writers hold it while they exist)."""
        with os.scandir(self._tmp) as entries:
            names = {_untag(e.name.split(".", 1)[0]) for e in entries}
        with os.scandir(self._fetched) as entries:
            names |= {_untag(e.name[1:].split(".", 1)[0]) for e in entries if e.name.startswith(".")}
        return self._dead(names, self._remove_temporaries)

    def clean(self) -> int:
        """Remove temporaries of dead downloads and receipts whose files are all gone; the files removed.

        Opening a cache does the first half. A receipt whose files are gone costs only its own block until
        an eviction drops it; this pass (one read per receipt) is for a rank's start, not for every worker.
        """
        self._check_fork()

        def orphaned(name: str) -> tuple[int, int]:
            for key in self._read_receipt(name):
                with contextlib.suppress(ManifestError):
                    check_key(key)
                    if os.path.lexists(os.path.join(self._root, *key.split("/"))):
                        return 0, 0
            freed = _unlink(self._receipt_path(name))
            return 1, freed

        removed = self._remove_dead_temporaries()[0]
        with os.scandir(self._fetched) as entries:
            receipts = {e.name for e in entries if not e.name.startswith(".")}
        return removed + self._dead(receipts, orphaned)[0]
