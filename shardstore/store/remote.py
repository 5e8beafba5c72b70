"""A cache in object storage, read through a node-local copy of the shards an epoch needs.

``ShardStore.open("s3://bucket/prefix", local_cache=DIR, cache_limit="50GB")`` brings the manifest
(header and table) into ``DIR`` — the local directory mirrors the bucket's layout, so the ordinary
reader opens it — and attaches a ``RemoteShards`` to the store. Before a shard's file is mapped,
``RemoteShards.ensure`` makes it present and complete in ``DIR`` (``shardstore.remote.local_cache``
fetches it once per node, under a per-shard lock, and keeps ``DIR`` under ``cache_limit``).

The rank's own threads download: a prefetcher walks the epoch's visit order ahead of the
consumers (``plan``), and starts the next epoch's first shards while the current one drains
(``plan_next``). A forked or spawned DataLoader worker never downloads: it waits for the
prefetcher and tells it, through a small shared file, which shard it has reached, so the
prefetcher's window moves with the workers. A shard the prefetcher could not fetch is written,
with its reason, to a file beside that one, and a worker waiting for it raises that reason; a
worker whose rank has exited stops waiting too. Shards the plan still needs, and shards a reader
has mapped, are pinned (a shared lock on their lock file): eviction never removes them.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import json
import logging
import mmap
import os
import secrets
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shardstore.errors import ManifestError, ShardstoreError
from shardstore.remote.clients import open_client
from shardstore.remote.gate import NodeGate
from shardstore.remote.local_cache import LocalCache, NoRoom, RemoteFile, ShardFiles
from shardstore.remote.objects import ObjectClient, ObjectNotFound
from shardstore.remote.retry import call_with_retries
from shardstore.remote.url import is_remote, parse_size
from shardstore.store.atomic import format_bytes, fsync_dir, write_bytes_atomic
from shardstore.store.layout import MANIFEST_NAME
from shardstore.store.manifest import Manifest
from shardstore.store.snapshot import _COLUMN_FILE, TABLE_DIR, TABLE_NAME, _current_table, _remove_table

log = logging.getLogger(__name__)

BOOKKEEPING = ".shardstore"
#: ranks of one node that open the store within this many seconds of each other share one manifest fetch
MANIFEST_TTL_S = 10.0
#: how long a DataLoader worker waits for the rank's prefetcher to bring a shard before it gives up
WORKER_WAIT_S = 600.0
_PROGRESS_SLOTS = 512
#: how long a prefetch waits for room in the local cache before it lets go and tries again later
PREFETCH_ROOM_WAIT_S = 1.0
#: requests in flight at once from all processes of a node (a cap the object store's throttling respects)
NODE_REQUESTS = 16


def shard_name(shard_id: int) -> str:
    """The name a shard's lock, pin and receipt go by in the local cache."""
    return f"shard_{int(shard_id):06d}"


def shard_id_of(name: str) -> int:
    return int(name.rsplit("_", 1)[1])


@dataclass
class RemoteStats:
    """What the consumers of one process waited for, beside what the local cache downloaded."""

    remote_wait_s: float = 0.0   # consumers waiting for a shard to arrive (download or another rank's)
    shards_waited: int = 0       # shards a consumer found missing and waited for
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add_wait(self, seconds: float) -> None:
        with self.lock:
            self.remote_wait_s += seconds
            self.shards_waited += 1


# -- the manifest ------------------------------------------------------------------------------


def _locked(path: Path):
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def fetch_manifest(client: ObjectClient, local: Path, *, ttl_s: float = MANIFEST_TTL_S, force: bool = False) -> int:
    """Bring the bucket's manifest (header, then the table it names) into ``local``; return the requests made.

    One process of the node fetches while the others wait on a lock file; those that arrive
    within ``ttl_s`` of a fetch reuse it without a request, so a node's start-up costs a few
    requests whatever its ranks and workers. The table is written under a temporary name and
    renamed into place before the header is replaced (as a local build does): a reader of
    ``local`` sees a whole snapshot, never a header without its table. The previous table is
    kept for readers that have just read the old header.
    """
    meta = local / BOOKKEEPING
    meta.mkdir(parents=True, exist_ok=True)
    stamp = meta / "manifest.checked"
    header_path = local / MANIFEST_NAME
    fd = _locked(meta / "manifest.lock")
    requests = 0
    try:
        if not force and header_path.exists() and stamp.exists() and time.time() - stamp.stat().st_mtime < ttl_s:
            return 0
        try:
            text = call_with_retries(lambda: client.get(MANIFEST_NAME), what=f"{client.url}/{MANIFEST_NAME}")
        except ObjectNotFound:
            raise ManifestError(f"{client.url}/{MANIFEST_NAME} does not exist; run `shardstore build-manifest "
                                f"{client.url}` first") from None
        requests += 1
        try:
            doc = json.loads(bytes(text))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ManifestError(f"{client.url}/{MANIFEST_NAME} is not JSON ({exc}); rebuild it with "
                                f"`shardstore build-manifest {client.url}`") from None
        table = doc.get("table") if isinstance(doc, dict) else None
        if isinstance(table, str):  # format 3: bring its table first
            name = table[len(TABLE_DIR) + 1:] if table.startswith(TABLE_DIR + "/") else ""
            columns = doc.get("columns")
            if not TABLE_NAME.match(name) or not isinstance(columns, dict) or not all(
                    isinstance(c, str) and _COLUMN_FILE.match(f"{c}.npy") for c in columns):
                raise ManifestError(f"{client.url}/{MANIFEST_NAME} names a table or columns that are not this "
                                    f"project's ({table!r:.60}); rebuild it with `shardstore build-manifest "
                                    f"{client.url}`")
            tables = local / TABLE_DIR
            tables.mkdir(exist_ok=True)
            if not (tables / name).is_dir():
                requests += _fetch_table(client, tables, name, sorted(columns))
            keep = {name, _current_table(local)}
        else:
            keep = set()
        write_bytes_atomic(header_path, bytes(text))
        stamp.touch()
        os.utime(stamp)
        tables = local / TABLE_DIR
        if keep and tables.is_dir():
            for entry in os.scandir(tables):
                if TABLE_NAME.match(entry.name) and entry.name not in keep:
                    _remove_table(Path(entry.path))
        return requests
    finally:
        os.close(fd)


def _fetch_table(client: ObjectClient, tables: Path, name: str, columns: Sequence[str]) -> int:
    tmp = tables / f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        for column in columns:
            key = f"{TABLE_DIR}/{name}/{column}.npy"
            try:
                data = call_with_retries(lambda key=key: client.get(key), what=f"{client.url}/{key}")
            except ObjectNotFound:
                raise ManifestError(f"{client.url}/{key}: a column of the bucket's manifest is missing (a build "
                                    f"was interrupted?); run `shardstore build-manifest {client.url}` again") from None
            with open(tmp / f"{column}.npy", "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        fsync_dir(tmp)
        os.rename(tmp, tables / name)
        fsync_dir(tables)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return len(columns)


# -- shards ------------------------------------------------------------------------------------


class RemoteShards:
    """The remote half of a store: which files a shard needs, fetching them ahead, and waiting for them.

    Lives in the rank's process; pickled into (or inherited by) a DataLoader worker it becomes a
    waiter that never downloads. ``prefetch_shards`` is how far ahead of the consumers the
    prefetcher fetches, in shards; ``cache_limit`` must hold that many of the largest shards.
    """

    def __init__(self, url: str, local: Path, limit: int, *, storage_options: Mapping[str, Any] | None = None,
                 prefetch_shards: int = 8, prefetch_threads: int = 2, client: ObjectClient | None = None) -> None:
        self.url = url
        self.local = Path(local)
        self.limit = int(limit)
        self.storage_options = dict(storage_options or {})
        self.prefetch_shards = max(1, int(prefetch_shards))
        self.prefetch_threads = max(1, int(prefetch_threads))
        self.client = client if client is not None else open_client(url, self.storage_options)
        self.owner_pid = os.getpid()
        self.stats = RemoteStats()
        self._cache: LocalCache | None = None
        self._cache_pid = -1
        self._cv = threading.Condition()
        self._plan: list[tuple[Manifest, int, tuple[str, ...]]] = []  # (manifest, position, fields) in visit order
        self._index: dict[int, int] = {}      # shard id -> first index in the plan
        self._next: list[tuple[Manifest, int, tuple[str, ...]]] = []
        self._cursor = 0                      # next plan index a prefetcher takes
        self._consumed = -1                   # highest plan index a consumer has reached
        self._generation = 0                  # bumped by every plan
        self._pins: dict[int, int] = {}       # shard id -> plan index pinned for (prefetch pins)
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._progress: mmap.mmap | None = None
        self._progress_path = self.local / BOOKKEEPING / "progress" / f"{self.owner_pid}-{secrets.token_hex(4)}"
        self._progress_slot = 0
        self._failed: set[int] = set()        # shards whose last prefetch failed (the rank's side)
        self._failures_read: tuple[int, dict[str, str]] = (0, {})  # (bytes read, shard -> reason) (a worker's)
        self.next_use: Callable[[str], float] | None = None
        self.errors: list[BaseException] = []

    # -- the local cache, per process --------------------------------------------------

    @property
    def cache(self) -> LocalCache:
        if self._cache is None or self._cache_pid != os.getpid():
            self._cache = LocalCache(self.local, self.limit, self.client, next_use=self._next_use,
                                     protected=self._protected,
                                     gate=NodeGate(self.local / BOOKKEEPING / "requests", NODE_REQUESTS))
            self._cache_pid = os.getpid()
        return self._cache

    @property
    def is_owner(self) -> bool:
        """True in the process that opened the store (a rank); False in its DataLoader workers."""
        return os.getpid() == self.owner_pid

    def _next_use(self, name: str) -> float:
        fn = self.next_use
        return fn(name) if fn is not None else float("inf")

    def _protected(self) -> set[str]:
        with self._cv:
            start = max(0, self._consumed)
            names = {shard_name(int(m.ids[p])) for m, p, _ in self._plan[start:]}
            names.update(shard_name(int(m.ids[p])) for m, p, _ in self._next[: self.prefetch_shards])
        return names

    # -- what a shard is ---------------------------------------------------------------

    @staticmethod
    def shard_files(manifest: Manifest, position: int, fields: Sequence[str]) -> ShardFiles:
        """The files of ``fields`` in the shard at ``position`` (those it has), as the cache fetches them."""
        files = []
        for name in fields:
            if not int(manifest.columns[f"{name}.offset"][position]):
                continue
            files.append(RemoteFile(manifest.file_path(position, name), manifest.file_bytes(position, name),
                                    manifest.checksum(position, name)))
        return ShardFiles(shard_name(int(manifest.ids[position])), tuple(files))

    def shard_bytes(self, manifest: Manifest, fields: Sequence[str]) -> int:
        """Bytes of the largest shard of ``manifest`` (its ``fields``) on a local disk (whole 4 KiB blocks)."""
        total = np.zeros(manifest.num_shards, np.int64)
        for name in fields:
            spec = manifest.fields[name]
            sample_bytes = int(spec.dtype.itemsize * int(np.prod(spec.shape, dtype=np.int64)))
            rows = np.asarray(manifest.counts, np.int64) * sample_bytes
            offsets = np.asarray(manifest.columns[f"{name}.offset"], np.int64)
            total += np.where(offsets > 0, -(-(offsets + rows) // 4096) * 4096, 0)  # in 4 KiB blocks, as du counts
        return int(total.max()) if total.size else 0

    def check_limit(self, manifest: Manifest, fields: Sequence[str]) -> None:
        """``cache_limit`` must hold the read-ahead: ``prefetch_shards`` + the shards being read, at their largest."""
        biggest = self.shard_bytes(manifest, fields)
        table = sum(-(-(int(getattr(c, "nbytes", 0)) + 128) // 4096) * 4096 for c in manifest.columns.values())
        # Every rank of the node pins its own read-ahead, and ranks drift a little apart: the node needs each one's.
        ranks = local_ranks()
        need = ranks * (self.prefetch_shards + 2) * (biggest + 4096 * (len(fields) + 2)) + 2 * (table + 4096) + 65536
        if self.limit < need:
            each = f" for each of the node's {ranks} ranks (LOCAL_WORLD_SIZE)" if ranks > 1 else ""
            raise ShardstoreError(
                f"cache_limit {format_bytes(self.limit)} is below what one epoch's read-ahead needs in "
                f"{self.local}: {self.prefetch_shards} shards ahead + 2 being read{each}, up to "
                f"{format_bytes(biggest)} each, and two copies of the manifest's table ({format_bytes(table)}) = "
                f"{format_bytes(need)}; raise cache_limit or lower prefetch_shards")

    # -- consumers ---------------------------------------------------------------------

    def ensure(self, manifest: Manifest, position: int, fields: Sequence[str], *, pin: bool = False) -> float:
        """Make the shard at ``position`` present locally before it is mapped; return seconds waited.

        In the rank's process a missing shard is fetched here (in this thread) unless a
        prefetcher or another rank of the node is already fetching it, in which case this waits
        for it. In a DataLoader worker it only waits for the rank's prefetcher.
        """
        shard = self.shard_files(manifest, position, fields)
        self._reached(int(manifest.ids[position]))
        owner = self.is_owner
        waited = self.cache.ensure(shard, may_download=owner, timeout=None if owner else WORKER_WAIT_S, pin=pin,
                                   give_up=None if owner else lambda: self._give_up(shard.name))
        if waited > 0.0005:
            self.stats.add_wait(waited)
        return waited

    def pin(self, manifest: Manifest, position: int) -> None:
        self.cache.pin(shard_name(int(manifest.ids[position])))

    def unpin(self, manifest: Manifest, position: int) -> None:
        self.cache.unpin(shard_name(int(manifest.ids[position])))

    def _reached(self, shard_id: int) -> None:
        """A consumer has reached ``shard_id``: move the prefetch window (here, or through the progress file)."""
        if self.is_owner:
            with self._cv:
                at = self._index.get(shard_id)
                if at is None and self._next and any(int(m.ids[p]) == shard_id for m, p, _ in self._next):
                    self._promote()
                    at = self._index.get(shard_id)
                if at is not None and at > self._consumed:
                    self._consumed = at
                    self._cv.notify_all()
            return
        progress = self._worker_progress()
        if progress is not None:
            np.frombuffer(progress, np.int64)[self._progress_slot] = shard_id + 1

    def _worker_progress(self) -> mmap.mmap | None:
        if self._progress is None or self._progress_slot == 0:
            try:
                fd = os.open(self._progress_path, os.O_RDWR)
            except OSError:
                return None
            try:
                self._progress = mmap.mmap(fd, _PROGRESS_SLOTS * 8)
            finally:
                os.close(fd)
            self._progress_slot = 1 + os.getpid() % (_PROGRESS_SLOTS - 1)
        return self._progress

    # -- a prefetch that failed, told to the workers waiting for it --------------------------

    @property
    def _failures_path(self) -> Path:
        """``<progress>.failed``: a line ``<shard>\t<reason>`` per failed prefetch, ``<shard>\t`` when it is tried
        again."""
        return self._progress_path.with_name(self._progress_path.name + ".failed")

    def _note_failure(self, shard_id: int, reason: str) -> None:
        """Append ``shard_id``'s line (one ``O_APPEND`` write, so the prefetcher's threads never interleave)."""
        line = f"{shard_name(shard_id)}\t{reason}\n".encode()
        try:
            fd = os.open(self._failures_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError:
            return  # the waiting worker times out instead
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def _record_failure(self, shard_id: int, error: BaseException) -> None:
        lines = str(error).strip().splitlines()
        self._note_failure(shard_id, f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__)
        with self._cv:
            self._failed.add(shard_id)

    def _clear_failures(self, shard_ids: Collection[int]) -> None:
        """These shards are to be tried again: a worker waiting for one of them waits for that attempt."""
        with self._cv:
            cleared = self._failed & set(shard_ids)
            self._failed -= cleared
        for shard_id in cleared:
            self._note_failure(shard_id, "")

    def _give_up(self, name: str) -> str | None:
        """Why a DataLoader worker waiting for shard ``name`` should stop: the rank's prefetcher failed on it (its
        reason, which names the object and the cause), or the rank's process is gone. None: keep waiting."""
        try:
            size = os.stat(self._failures_path).st_size
        except OSError:
            size = 0
        if size > self._failures_read[0]:
            with open(self._failures_path, "rb") as f:
                text = f.read().decode("utf-8", "replace")
            complete = text[: text.rfind("\n") + 1]  # a line being appended is read at the next poll
            failures: dict[str, str] = {}
            for line in complete.splitlines():
                shard, _, reason = line.partition("\t")
                failures[shard] = reason
            self._failures_read = (len(complete.encode()), failures)
        reason = self._failures_read[1].get(name)
        if reason:
            return f"{reason} (the rank's prefetcher could not fetch shard {name}, which this DataLoader worker reads)"
        try:
            os.kill(self.owner_pid, 0)
        except ProcessLookupError:
            return (f"shard {name} will not arrive: the rank process {self.owner_pid} that fetches this DataLoader "
                    "worker's shards has exited")
        except OSError:
            pass  # alive, but not ours to signal
        return None

    def _poll_workers(self) -> None:
        """Fold the shards DataLoader workers have reached into the consumer position."""
        if self._progress is None:
            return
        seen = np.frombuffer(self._progress, np.int64)[1:]
        reached = [self._index.get(int(s) - 1, -1) for s in seen[seen > 0]]
        if reached and max(reached) > self._consumed:
            self._consumed = max(reached)

    # -- the prefetcher ------------------------------------------------------------------

    def plan(self, manifest: Manifest, positions: Sequence[int] | np.ndarray, fields: Sequence[str]) -> None:
        """The epoch's shards in visit order: fetch them ahead of the consumers from now on."""
        if not self.is_owner:
            return
        self._start()
        fields = tuple(fields)
        with self._cv:
            old = set(self._pins)
            self._plan = [(manifest, int(p), fields) for p in positions]
            self._index = {}
            for i, (m, p, _) in enumerate(self._plan):
                self._index.setdefault(int(m.ids[p]), i)
            self._next = []
            self._cursor = 0
            self._consumed = -1
            self._generation += 1
            failed = set(self._failed)
            if self._progress is not None:
                np.frombuffer(self._progress, np.int64)[1:] = 0
            keep = set(self._index)
            self._cv.notify_all()
        for shard_id in old - keep:
            self._drop_pin(shard_id)
        self._clear_failures(failed & keep)

    def offer(self, manifest: Manifest, positions: Sequence[int] | np.ndarray, fields: Sequence[str]) -> None:
        """A loader's plan: the current one when none is set, else (unless the current plan has its shards) the next."""
        if not self.is_owner:
            return
        ids = {int(manifest.ids[p]) for p in positions}
        with self._cv:
            current = not self._plan
            if not current and ids <= set(self._index):
                return
        (self.plan if current else self.plan_next)(manifest, positions, fields)

    def _promote(self) -> None:
        """The consumers reached the next plan: it becomes the current one (called holding the lock)."""
        fetched = max(0, self._cursor - len(self._plan))
        self._plan, self._next = self._next, []
        self._index = {}
        for i, (m, p, _) in enumerate(self._plan):
            self._index.setdefault(int(m.ids[p]), i)
        for shard_id, i in list(self._pins.items()):
            self._pins[shard_id] = self._index.get(shard_id, 0)
        self._cursor = max(0, min(fetched, len(self._plan)))
        self._consumed = -1
        self._generation += 1
        self._cv.notify_all()

    def plan_next(self, manifest: Manifest, positions: Sequence[int] | np.ndarray, fields: Sequence[str]) -> None:
        """The next epoch's shards: fetched once the current plan is fetched, as far as the window allows."""
        if not self.is_owner:
            return
        self._start()
        with self._cv:
            self._next = [(manifest, int(p), tuple(fields)) for p in positions]
            self._cv.notify_all()

    def _start(self) -> None:
        if self._threads and all(t.is_alive() for t in self._threads):
            return
        progress_dir = self._progress_path.parent
        progress_dir.mkdir(parents=True, exist_ok=True)
        if self._progress is None:
            with open(self._progress_path, "wb") as f:
                f.truncate(_PROGRESS_SLOTS * 8)
            weakref.finalize(self, _unlink_quietly, str(self._progress_path))
            weakref.finalize(self, _unlink_quietly, str(self._failures_path))
            fd = os.open(self._progress_path, os.O_RDWR)
            try:
                self._progress = mmap.mmap(fd, _PROGRESS_SLOTS * 8)
            finally:
                os.close(fd)
        _OWNERS.add(self)
        self._threads = [threading.Thread(target=_prefetch_loop, args=(weakref.ref(self),),
                                          name=f"shardstore-prefetch-{i}", daemon=True)
                         for i in range(self.prefetch_threads)]
        for t in self._threads:
            t.start()

    def _try_take(self) -> tuple[int, int, tuple[Manifest, int, tuple[str, ...]]] | str | None:
        """The next shard to fetch (generation, index, item); ``"wait"`` while it lies beyond the window or
        there is none; None once closed."""
        with self._cv:
            if self._closed:
                return None
            self._poll_workers()
            if self._cursor < len(self._plan):
                if self._cursor <= self._consumed + self.prefetch_shards:
                    i = self._cursor
                    self._cursor += 1
                    return self._generation, i, self._plan[i]
            else:
                j = self._cursor - len(self._plan)
                behind = len(self._plan) - 1 - self._consumed
                if j < len(self._next) and j + behind < self.prefetch_shards:
                    self._cursor += 1
                    return self._generation, -1 - j, self._next[j]
            return "wait"

    def _fetch_one(self, task: tuple[int, int, tuple[Manifest, int, tuple[str, ...]]]) -> None:
        generation, index, (manifest, position, fields) = task
        shard_id = int(manifest.ids[position])
        self._clear_failures((shard_id,))
        try:
            # Fetched and pinned in one step: no other process can evict it in between. A prefetch never waits
            # long for room (it would hold the shard's lock while readers free the room it waits for).
            self.cache.ensure(self.shard_files(manifest, position, fields), may_download=True, pin=True,
                              timeout=PREFETCH_ROOM_WAIT_S)
        except NoRoom:
            with self._cv:  # no room yet: the same shard again once readers have moved on
                if generation == self._generation:
                    self._cursor = min(self._cursor, index if index >= 0 else len(self._plan) - 1 - index)
                self._cv.wait(0.1)
            return
        except BaseException as exc:  # noqa: BLE001 - the consumer meets it when it reaches the shard
            log.debug("prefetch of shard %d failed: %s", shard_id, exc)
            self._record_failure(shard_id, exc)  # a worker waiting for it raises it (it cannot fetch)
            return
        with self._cv:
            keep = generation == self._generation and shard_id not in self._pins
            if keep:
                self._pins[shard_id] = index
        if not keep:
            self.cache.unpin(shard_name(shard_id))
        self._release_consumed()

    def _release_consumed(self) -> None:
        """Drop the prefetch pins of shards the consumers have passed (their maps pin them while in use)."""
        with self._cv:
            done = [s for s, i in self._pins.items() if 0 <= i < self._consumed - 1]
        for shard_id in done:
            self._drop_pin(shard_id)

    def _drop_pin(self, shard_id: int) -> None:
        with self._cv:
            if self._pins.pop(shard_id, None) is None:
                return
        self.cache.unpin(shard_name(shard_id))

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the prefetchers (a download in flight may finish within ``timeout_s``), let go of the pins, and
        remove this process's progress files and any temporaries a download it could not finish left."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        for shard_id in list(self._pins):
            self._drop_pin(shard_id)
        if self.is_owner:
            for path in (self._progress_path, self._failures_path):
                _unlink_quietly(str(path))
            _remove_own_temporaries(self.local)


    # -- pickling: a worker gets a waiter -------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url, "local": self.local, "limit": self.limit, "storage_options": self.storage_options,
                "prefetch_shards": self.prefetch_shards, "prefetch_threads": self.prefetch_threads,
                "client": self.client, "owner_pid": self.owner_pid, "progress_path": self._progress_path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["url"], state["local"], state["limit"], storage_options=state["storage_options"],
                      prefetch_shards=state["prefetch_shards"], prefetch_threads=state["prefetch_threads"],
                      client=state["client"])
        self.owner_pid = state["owner_pid"]
        self._progress_path = state["progress_path"]

    def __repr__(self) -> str:
        return f"RemoteShards({self.url!r}, local_cache={str(self.local)!r}, cache_limit={format_bytes(self.limit)})"


_OWNERS: weakref.WeakSet[RemoteShards] = weakref.WeakSet()


def _close_at_exit() -> None:
    """At interpreter exit, before daemon threads are stopped mid-write: no new prefetch starts, and this process's
    unfinished download temporaries go (nothing is joined: exiting never waits on the network)."""
    for shards in list(_OWNERS):
        if shards.is_owner:
            with shards._cv:
                shards._closed = True
                shards._cv.notify_all()
            _remove_own_temporaries(shards.local)


atexit.register(_close_at_exit)


def _remove_own_temporaries(local: Path) -> None:
    """This process's download temporaries (``<shard>.<file>.<pid>.<hex>.part``): their writer is stopping."""
    marker = f".{os.getpid()}."
    try:
        entries = list(os.scandir(local / BOOKKEEPING / "tmp"))
    except FileNotFoundError:
        return
    for entry in entries:
        if entry.name.endswith(".part") and marker in entry.name:
            _unlink_quietly(entry.path)


def local_ranks() -> int:
    """Processes of this node that read the cache: torchrun's ``LOCAL_WORLD_SIZE`` (SLURM's tasks per node), else 1."""
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        try:
            return max(1, int(os.environ.get(name, "")))
        except ValueError:
            continue
    return 1


def _remove_dead_progress(local: Path) -> None:
    """Progress and failure files of ranks that are gone (named ``<pid>-<nonce>``; a node's own pids)."""
    from shardstore.store.atomic import pid_alive

    directory = local / BOOKKEEPING / "progress"
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return
    for entry in entries:
        pid = entry.name.split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            _unlink_quietly(entry.path)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _prefetch_loop(ref: weakref.ref[RemoteShards]) -> None:
    """A prefetcher thread. It waits without holding its ``RemoteShards``, so one nobody uses any more is
    collected, and the thread then ends."""
    while True:
        shards = ref()
        if shards is None:
            return
        task, cv = shards._try_take(), shards._cv
        if task is None:
            return
        if task != "wait":
            shards._fetch_one(task)  # type: ignore[arg-type]
            continue
        del shards
        with cv:
            cv.wait(0.05)


def open_remote(url: str, *, local_cache: str | os.PathLike[str] | None, cache_limit: int | str | None,
                storage_options: Mapping[str, Any] | None = None, prefetch_shards: int = 8,
                client: ObjectClient | None = None) -> tuple[Path, RemoteShards]:
    """Bring ``url``'s manifest into ``local_cache`` and return the local root and the store's remote half."""
    if not is_remote(url):
        raise ShardstoreError(f"{url!r} is not an object-store URL (s3://, gs://, az://, file://)")
    if local_cache is None:
        raise ShardstoreError(f"{url} is in object storage: pass local_cache=DIR (data_config: local_cache:), a "
                              "node-local directory the shards an epoch needs are copied into")
    if cache_limit is None:
        raise ShardstoreError(f"{url}: pass cache_limit (e.g. \"50GB\"), the most the local cache {local_cache} "
                              "may hold")
    limit = parse_size(cache_limit)
    local = Path(local_cache).expanduser()
    try:
        local.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ShardstoreError(f"local_cache {local} cannot be created ({exc.strerror or exc}); pass a writable "
                              "node-local directory") from None
    remote = RemoteShards(url.rstrip("/"), local, limit, storage_options=storage_options,
                          prefetch_shards=prefetch_shards, client=client)
    _claim(local, remote.url)
    remote.cache.clean()
    _remove_dead_progress(local)
    fetch_manifest(remote.client, local)
    return local, remote


def _claim(local: Path, url: str) -> None:
    """One local cache serves one bucket prefix: refuse a directory that holds another's shards.

    The claim is written whole under a temporary name and linked into place (``link`` fails if a claim exists), so
    a rank never reads a claim another is still writing, and one killed mid-claim leaves none, or an empty file from
    an older version, which the next claim replaces.
    """
    meta = local / BOOKKEEPING
    try:
        meta.mkdir(exist_ok=True)
        for stale in meta.glob(".source-*"):  # a claimer killed between its write and its link (a few bytes)
            with contextlib.suppress(OSError):
                if time.time() - stale.stat().st_mtime > 60:
                    stale.unlink()
        fd, tmp = tempfile.mkstemp(prefix=".source-", dir=meta)
    except OSError as exc:
        if exc.errno in (errno.EROFS, errno.EACCES):
            raise ShardstoreError(f"local_cache {local} is not writable; pass a writable node-local "
                                  "directory") from None
        raise
    source = meta / "source"
    try:
        with os.fdopen(fd, "w") as f:
            f.write(url + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, source)
            return
        except FileExistsError:
            pass
        held = source.read_text().strip()
        if not held:  # an older version's claim, cut before its write
            os.replace(tmp, source)
            return
        if held != url:
            raise ShardstoreError(f"local_cache {local} holds shards of {held}, not {url}; give each remote cache "
                                  "its own local_cache directory") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def read_remote_manifest(url: str, *, storage_options: Mapping[str, Any] | None = None,
                         client: ObjectClient | None = None) -> Manifest:
    """The manifest of the cache at ``url`` (header and table fetched into a temporary directory; no shard read)."""
    import tempfile

    from shardstore.store.snapshot import read_manifest

    if client is None:
        client = open_client(url.rstrip("/"), dict(storage_options or {}))
    with tempfile.TemporaryDirectory(prefix="shardstore-manifest-") as tmp:
        fetch_manifest(client, Path(tmp), force=True)
        manifest = read_manifest(tmp)
        # Columns are memory-mapped: they stay readable after the directory is removed.
        return manifest
