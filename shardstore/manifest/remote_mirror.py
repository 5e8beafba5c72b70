"""The build mirror of a cache in object storage: a local directory of sparse files holding what a build reads.

Each shard file in the bucket's listing (named by the local discovery rules: ``shard_<id>/<field>.npy``
and ``<field>_<id>.npy``) is mirrored into a local directory as a *sparse* file of the object's exact
size holding only the bytes a build reads -- its ``.npy`` header, and the data of a small label-like
file (integers, one per sample, at most ``LABEL_RANGE_BYTES``) whose value range the manifest records --
fetched with ranged GETs (one for a header; a file of at most ``SMALL_OBJECT_BYTES`` whole in that one;
see ``needed_bytes``); the rest is a hole. The bucket's current manifest (``manifest.json`` and its
table) and the group declarations are brought in beside them, so that ``build_manifest`` can run on the
mirror as on a disk (``remote_build.build_remote_manifest`` does).

A mirror file's mtime is a stamp of the object's identity (``object_stamp``: its last-modified
second, the sub-second part from its ETag and version), so the build sees a file as unchanged
exactly when the object is, and the table records that stamp as the file's ``mtime_ns``. The
mirror is kept between runs (``default_mirror_dir``) but is never trusted beyond what the
listing confirms: a file whose size or stamp differs from its object is fetched again, a file
without an object is removed, and a mirror a machine lost power in the middle of writing is
dropped whole. A stale or missing mirror only costs requests.

A file whose checksum the bucket's table records and whose object changed is hashed by the build
(as on a disk), so that one object is downloaded whole into the mirror (``fetch_hashed``) and made
sparse again afterwards (``make_sparse``). Every request goes through ``_Remote``, the client with
retries that counts requests and bytes; the upload in ``remote_build`` uses it too.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from shardstore.errors import ManifestError
from shardstore.manifest.previous import previous_manifest
from shardstore.manifest.scan import LABEL_RANGE_BYTES
from shardstore.remote.objects import (
    ObjectChanged,
    ObjectClient,
    ObjectInfo,
    ObjectNotFound,
    RemoteError,
)
from shardstore.remote.retry import call_with_retries
from shardstore.store.groups import GROUP_FILE, MAX_DECLARATION_BYTES
from shardstore.store.layout import (
    FLAT_FILE,
    MANIFEST_NAME,
    NATIVE_DIR,
    NATIVE_FILE,
    parse_shard_id,
)
from shardstore.store.npy import HEAD_BYTES, MAGIC, MAX_HEADER_BYTES, read_header_bytes
from shardstore.store.snapshot import TABLE_DIR, TABLE_NAME

log = logging.getLogger(__name__)

#: objects up to this size are fetched whole in their one GET (labels of a few thousand samples, small fields)
SMALL_OBJECT_BYTES = 64 << 10
#: requests in flight at once while headers are fetched and the table is uploaded
REQUEST_THREADS = 16
#: objects handed to the fetching threads at a time (bounds the futures alive at 10^6 objects)
FETCH_BATCH = 4096
#: bytes per GET when an object is downloaded whole to be hashed
HASH_CHUNK_BYTES = 8 << 20
#: the column files a table of this project holds (the names ``store.snapshot`` writes)
_COLUMN = r"(?:id|samples|layout|digits|since|[A-Za-z][A-Za-z0-9_]*\.(?:offset|mtime_ns|min|max|sha256))\.npy"
_TABLE_OBJECT = re.compile(rf"^{TABLE_DIR}/([0-9a-f]{{16}}-[0-9a-f]{{8}})/{_COLUMN}\Z")
_STAMP_BASE_NS = 946_684_800 * 10**9  # 2000-01-01: stamps of objects listed without a last-modified time
_LOCK_NAME = "mirror.lock"  # never unlinked; also what marks a directory as a mirror this module may clean
_STATE_NAME = "state.json"

def default_mirror_dir(url: str) -> Path:
    """Where the mirror of ``url`` is kept: ``$XDG_CACHE_HOME/shardstore/build/<hash of the URL>``."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "shardstore" / "build" / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]


def object_stamp(info: ObjectInfo) -> int | None:
    """The mtime (ns) that stands for this version of the object; None if the listing says too little.

    Its last-modified second, with the nanoseconds taken from a hash of its ETag and version:
    an object replaced within the same second (S3 keeps seconds) still gets a new stamp.
    """
    if not info.etag and not info.version:
        return info.mtime_ns
    digest = hashlib.sha256(f"{info.etag or ''}\0{info.version or ''}".encode()).digest()
    h = int.from_bytes(digest[:8], "little")
    if info.mtime_ns is None:
        return _STAMP_BASE_NS + h % 10**18
    return info.mtime_ns // 10**9 * 10**9 + h % 10**9


def shard_key(key: str) -> tuple[str, int | None] | None:
    """(field, shard id) if ``key`` names a shard file by the discovery rules; None for any other object."""
    top, sep, rest = key.partition("/")
    if sep:
        d = NATIVE_DIR.match(top)
        f = NATIVE_FILE.match(rest) if d is not None and "/" not in rest else None
        return (f.group(1), parse_shard_id(d.group(1))) if f is not None else None  # type: ignore[union-attr]
    f = FLAT_FILE.match(key)
    return (f.group(1), parse_shard_id(f.group(2))) if f is not None else None


def needed_bytes(head: bytes, size: int) -> int:
    """How many leading bytes of an object of ``size`` a build reads, knowing its first bytes ``head``.

    Its whole header (up to the longest one a build accepts), and the data of a label-like file
    whose value range the build records. ``len(head)`` when ``head`` holds all of that, or when
    it is not an ``.npy`` file (the build reports what it finds in the bytes it has).
    """
    if len(head) >= size:
        return size
    if len(head) < 12 or head[:6] != MAGIC:
        return len(head)
    if head[6:8] == b"\x01\x00":
        end = 10 + int.from_bytes(head[8:10], "little")
    elif head[6:8] in (b"\x02\x00", b"\x03\x00"):
        end = 12 + int.from_bytes(head[8:12], "little")
    else:
        return len(head)
    end = min(end, MAX_HEADER_BYTES + 16, size)
    if end > len(head):
        return end  # the header first; whether its labels are needed is known once it is whole
    try:
        header = read_header_bytes(head)
    except Exception:  # noqa: BLE001 - a damaged header is the build's to report
        return len(head)
    label_like = header.dtype.kind in "iu" and header.shape[1:] in ((), (1,))
    if label_like and 0 < header.data_bytes <= LABEL_RANGE_BYTES and header.file_bytes == size:
        return size
    return len(head)


class _Remote:
    """The client, every call through the retries, counted."""

    def __init__(self, client: ObjectClient) -> None:
        self.client = client
        self.url = client.url.rstrip("/")
        self.requests: Counter[str] = Counter()
        self.bytes_fetched = 0
        self._lock = threading.Lock()  # (the counters are updated from the request threads)

    def _call(self, kind: str, what: str, fn: Callable[[], object]) -> object:
        def attempt() -> object:
            with self._lock:
                self.requests[kind] += 1  # (every attempt: a retried request is another request)
            return fn()

        return call_with_retries(attempt, what=f"{kind} {self.url}/{what}")

    def list(self) -> list[ObjectInfo]:
        return self._call("LIST", "", lambda: list(self.client.list("")))  # type: ignore[return-value]

    def head(self, key: str) -> ObjectInfo:
        return self._call("HEAD", key, lambda: self.client.head(key))  # type: ignore[return-value]

    def get(self, key: str) -> bytes:
        data: bytes = self._call("GET", key, lambda: self.client.get(key))  # type: ignore[assignment]
        with self._lock:
            self.bytes_fetched += len(data)
        return data

    def get_range(self, key: str, start: int, end: int, etag: str | None) -> bytes:
        data: bytes = self._call("GET", f"{key} [{start}, {end})",  # type: ignore[assignment]
                                 lambda: self.client.get_range(key, start, end, if_match=etag))
        with self._lock:
            self.bytes_fetched += len(data)
        return data

    def put(self, key: str, data: bytes) -> None:
        self._call("PUT", key, lambda: self.client.put(key, data))

    def delete(self, key: str) -> None:
        self._call("DELETE", key, lambda: self.client.delete(key))


def _table_name(header: bytes) -> str | None:
    """The table a format-3 header names, or None (another format, or not a header of this project)."""
    try:
        table = json.loads(header).get("table")
    except (ValueError, UnicodeDecodeError, AttributeError, RecursionError):
        return None
    name = table[len(TABLE_DIR) + 1:] if isinstance(table, str) and table.startswith(TABLE_DIR + "/") else ""
    return name if TABLE_NAME.match(name) else None


@contextmanager
def _locked(directory: Path, url: str) -> Iterator[None]:
    """Hold the mirror's lock (one build per mirror); refuse a directory that is not a mirror."""
    lock = directory / _LOCK_NAME
    if directory.exists() and not lock.exists() and any(os.scandir(directory)):
        raise ManifestError(f"{directory} is not a build mirror (it lacks {_LOCK_NAME}) and is not empty; "
                            "pass a new or empty directory as the mirror")
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ManifestError(f"another build-manifest of {url} is running on this machine (it holds {lock}); "
                                "wait for it to finish") from None
        yield
    finally:
        os.close(fd)


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def _syncfs(path: Path) -> None:
    """Make what was written under ``path`` durable (``syncfs`` of its file system, else ``sync``)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), "syncfs", None)
        if fn is None or fn(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


class _Mirror:
    """The local directory the build runs on: one sparse file per shard object, the manifest, the declarations."""

    def __init__(self, directory: Path, remote: _Remote, progress: Callable[[int], None] | None) -> None:
        self.root = directory / "tree"
        self.remote = remote
        self.progress = progress
        self.headers_fetched = 0
        self._lock = threading.Lock()
        self._state = directory / _STATE_NAME
        self._shards: dict[str, ObjectInfo] = {}
        self._begin()

    # -- staying trustworthy -------------------------------------------------------------------

    def _begin(self) -> None:
        """Drop a mirror that was being written when its machine went down; mark this one as being written."""
        try:
            state = json.loads(self._state.read_text())
        except (OSError, ValueError):
            state = None
        boot = _boot_id()
        clean = isinstance(state, dict) and (state.get("clean") is True or (boot and state.get("boot") == boot))
        if self.root.exists() and not clean:
            log.info("%s was being written when its machine stopped; it is fetched again", self.root)
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._write_state({"boot": boot, "clean": False})

    def finish(self) -> None:
        """Everything written is durable: a restart may trust the mirror."""
        _syncfs(self.root)
        self._write_state({"boot": _boot_id(), "clean": True})

    def _write_state(self, state: dict) -> None:
        tmp = self._state.with_name(f".{_STATE_NAME}.tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self._state)

    # -- bringing it up to date ------------------------------------------------------------------

    def sync(self, listing: list[ObjectInfo]) -> str | None:
        """Mirror the bucket's manifest, declarations and shard files; return the table its header names."""
        wanted: dict[str, ObjectInfo] = {}
        header = table = None
        for info in listing:
            key = info.key
            if key == MANIFEST_NAME:
                header = info
            elif shard_key(key) is not None or GROUP_FILE.fullmatch(key):
                wanted[key] = info
        path = self.root / MANIFEST_NAME
        if header is None:
            path.unlink(missing_ok=True)  # the build starts over, as the bucket has no manifest
        else:
            self._whole(header)
            table = _table_name(path.read_bytes())
            if table is not None:
                self._table(table, listing)
        self._shards = {k: i for k, i in wanted.items() if not GROUP_FILE.fullmatch(k)}
        current = self._current(wanted)
        for key, info in wanted.items():
            if key not in current and key not in self._shards:
                self._write(info, [(0, self.remote.get_range(key, 0, min(info.size, MAX_DECLARATION_BYTES + 1),
                                                             info.etag) if info.size else b"")])
        self._fetch_heads([self._shards[k] for k in self._shards if k not in current])
        return table

    def _table(self, name: str, listing: list[ObjectInfo]) -> None:
        """Mirror the columns of the bucket's table ``name``: what the bucket lacks, the mirror lacks too."""
        prefix = f"{TABLE_DIR}/{name}/"
        columns = [i for i in listing if i.key.startswith(prefix) and _TABLE_OBJECT.match(i.key)]
        directory = self.root / TABLE_DIR / name
        if directory.is_dir():
            listed = {i.key for i in columns}
            for entry in os.scandir(directory):
                if prefix + entry.name not in listed:
                    _remove(entry)
        for info in columns:
            self._whole(info)

    def _current(self, wanted: dict[str, ObjectInfo]) -> set[str]:
        """The keys whose mirror file is the object's (size and stamp); every other file is removed."""
        current: set[str] = set()

        def check(entry: os.DirEntry, key: str) -> None:
            info = wanted.get(key)
            if info is not None and entry.is_file(follow_symlinks=False) and _same(entry.stat(), info):
                current.add(key)
            else:
                _remove(entry)

        for entry in os.scandir(self.root):
            name = entry.name
            if name in (MANIFEST_NAME, TABLE_DIR) or name.startswith("."):
                continue  # the build's own (its temporaries it removes itself)
            if NATIVE_DIR.match(name) and entry.is_dir(follow_symlinks=False):
                found = len(current)
                with os.scandir(entry.path) as inner:
                    for f in inner:
                        check(f, f"{name}/{f.name}")
                if len(current) == found:
                    os.rmdir(entry.path)
            else:
                check(entry, name)
        return current

    def _whole(self, info: ObjectInfo) -> None:
        """Mirror a small object (the manifest's header and columns) whole, unless the mirror holds it already."""
        path = self.root / info.key
        try:
            if _same(os.stat(path, follow_symlinks=False), info) and path.is_file():
                return
        except FileNotFoundError:
            pass
        self._write(info, [(0, self.remote.get(info.key))])

    def _write(self, info: ObjectInfo, pieces: list[tuple[int, bytes]]) -> None:
        """Write the object's file: ``pieces`` at their offsets, holes elsewhere, its stamp as mtime (set last).

        Until the stamp is set the file is not taken for the object's, so a build killed
        meanwhile leaves a file the next one fetches again.
        """
        path = self.root / info.key
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink() or path.is_dir():
            _remove_path(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            for offset, data in pieces:
                os.pwrite(fd, data, offset)
            os.ftruncate(fd, info.size)
        finally:
            os.close(fd)
        stamp = object_stamp(info)
        if stamp is not None:  # (without one the file never matches: fetched again by every build)
            os.utime(path, ns=(stamp, stamp))

    def _fetch_heads(self, todo: list[ObjectInfo]) -> None:
        """Fetch the first bytes of each object in ``todo`` (REQUEST_THREADS at a time) into its sparse file."""
        if not todo:
            return
        with ThreadPoolExecutor(REQUEST_THREADS, thread_name_prefix="shardstore-fetch") as pool:
            for start in range(0, len(todo), FETCH_BATCH):
                for got in pool.map(self._fetch_head, todo[start:start + FETCH_BATCH]):
                    if got and self.progress is not None:
                        self.progress(got)

    def _fetch_head(self, info: ObjectInfo) -> int:
        """Fetch what a build reads of one object and write its file; 0 if the object is gone meanwhile."""
        key = info.key
        for _ in range(3):
            try:
                head = b""
                want = info.size if info.size <= SMALL_OBJECT_BYTES else HEAD_BYTES
                while want > len(head):
                    head += self.remote.get_range(key, len(head), want, info.etag)
                    want = needed_bytes(head, info.size)
            except ObjectNotFound:
                return 0  # deleted since it was listed: as if the listing had not seen it
            except ObjectChanged:
                try:
                    info = replace(self.remote.head(key), key=key)  # replaced since it was listed: this version
                except ObjectNotFound:
                    return 0
                continue
            self._write(info, [(0, head)])
            with self._lock:
                self.headers_fetched += 1
            return len(head)
        raise RemoteError(f"{self.remote.url}/{key}: replaced again each time its header was read; "
                          "run build-manifest again once writes to the cache stop")

    # -- files the build will hash ---------------------------------------------------------------

    def fetch_hashed(self) -> list[ObjectInfo]:
        """Download whole the objects an incremental build will hash; return them (``make_sparse`` undoes it).

        A build hashes a file whose checksum the previous table records when the file changed
        since (same size, another mtime), to tell a new content from the same one rewritten.
        """
        try:
            doc = json.loads((self.root / MANIFEST_NAME).read_bytes())
        except (OSError, ValueError, UnicodeDecodeError, RecursionError):
            doc = None
        if isinstance(doc, dict) and "table" in doc and doc.get("checksummed_fields") == []:
            return []  # (the usual: a table without checksums, known from its header alone)
        quiet = logging.getLogger("shardstore.manifest.previous")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # the build says the same about the previous manifest a moment later
        try:
            previous = previous_manifest(self.root)
        finally:
            quiet.setLevel(level)
        lend = previous.lend
        m = previous.manifest
        if lend is None or (m is not None and not any(c.endswith(".sha256") for c in m.columns)):
            return []
        whole = []
        for key, info in self._shards.items():
            field_name, shard_id = shard_key(key)  # type: ignore[misc]
            old = lend(key, shard_id, field_name) if shard_id is not None else None
            stamp = object_stamp(info)
            # (what Scan._checksum hashes: a file with a recorded checksum, its size as recorded, its mtime not)
            if old is None or old.checksum is None or not old.strict:
                continue
            if old.bytes is not None and old.bytes != info.size:
                continue
            if old.bytes == info.size and old.mtime_ns == stamp:
                continue
            path = self.root / key
            fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                for start in range(0, info.size, HASH_CHUNK_BYTES):
                    end = min(info.size, start + HASH_CHUNK_BYTES)
                    os.pwrite(fd, self.remote.get_range(key, start, end, info.etag), start)
            finally:
                os.close(fd)
            if stamp is not None:
                os.utime(path, ns=(stamp, stamp))
            whole.append(info)
        return whole

    def make_sparse(self, infos: list[ObjectInfo]) -> None:
        """Turn files downloaded whole back into holes past the bytes a build reads."""
        for info in infos:
            path = self.root / info.key
            with open(path, "rb") as f:
                head = f.read(HEAD_BYTES)
                while (want := needed_bytes(head, info.size)) > len(head):
                    head += f.read(want - len(head))
            os.truncate(path, len(head))
            os.truncate(path, info.size)
            stamp = object_stamp(info)
            if stamp is not None:
                os.utime(path, ns=(stamp, stamp))


def _same(st: os.stat_result, info: ObjectInfo) -> bool:
    stamp = object_stamp(info)
    return stamp is not None and st.st_size == info.size and st.st_mtime_ns == stamp


def _remove(entry: os.DirEntry) -> None:
    _remove_path(Path(entry.path))


def _remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
