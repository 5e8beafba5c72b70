"""``FileClient``: objects as files under a local directory (``file://``), for tests, NFS and shared file systems.

Like every object client it only translates: each call is one file operation, and each failure becomes one of
the errors of ``shardstore.remote.objects`` with a one-line message naming the object's URL; it never retries
(callers wrap calls in ``retry.call_with_retries``). ``check_key`` and ``_check_range``, the argument checks
every client runs, live here too.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from collections.abc import Iterator

from shardstore.errors import ShardstoreError
from shardstore.remote.objects import (
    ObjectChanged,
    ObjectInfo,
    ObjectNotFound,
    RemoteError,
    TransientRemoteError,
)

#: The errno values of a local read or write worth retrying (the same kinds a network hiccup gives).
_TRANSIENT_ERRNOS = {errno.EIO, errno.EINTR, errno.EAGAIN, errno.ETIMEDOUT, errno.ESTALE}


def check_key(key: str, root_url: str) -> str:
    """``key`` if it is a relative ``/``-separated key without empty, ``.`` or ``..`` segments; else one line."""
    if not isinstance(key, str) or not key:
        raise ShardstoreError(f"empty or non-string object key {key!r} under {root_url}; give a relative key "
                              f"such as 'shard_000001/images.npy'")
    parts = key.split("/")
    if key.startswith("/") or "\x00" in key or "\\" in key or any(p in ("", ".", "..") for p in parts):
        raise ShardstoreError(f"object key {key!r} under {root_url} is not a plain relative key (absolute, "
                              f"'..', '.', '//', a backslash or NUL); give a key such as 'shard_000001/images.npy'")
    return key


def _check_range(start: int, end: int) -> None:
    if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end):
        raise ValueError(f"byte range [{start!r}, {end!r}) is not 0 <= start <= end")


def file_etag(st: os.stat_result) -> str:
    """What identifies this version of a local file: inode, size and modification time (hex, ``-``-joined)."""
    return f"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}"


class FileClient:
    """Objects as files under a local directory (``file:///abs/dir``): for tests, NFS and shared file systems.

    An object's ETag is ``file_etag`` of its ``stat``: replacing it (a rename over it, or an in-place write that
    moves its mtime) changes the ETag. ``put`` writes a hidden temporary in the same directory
    (``.<name>.tmp-<pid>-<hex>``), fsyncs and renames it over the key, so readers see the old object or the
    new one; ``list`` shows every file, temporaries included (callers filter).
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        root = os.path.abspath(os.fspath(root))
        self.root = root
        self.url = "file://" + root.rstrip("/") if root != "/" else "file:///"

    def __repr__(self) -> str:
        return f"FileClient({self.root!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FileClient) and other.root == self.root

    def __hash__(self) -> int:
        return hash(self.root)

    def _path(self, key: str) -> str:
        return os.path.join(self.root, *check_key(key, self.url).split("/"))

    def _object_url(self, key: str) -> str:
        return f"{self.url.rstrip('/')}/{key}"

    def _error(self, key: str, error: OSError, doing: str) -> RemoteError:
        where = self._object_url(key)
        if isinstance(error, (FileNotFoundError, NotADirectoryError, IsADirectoryError)):
            return ObjectNotFound(f"{where}: no such object; check the URL and the key")
        reason = error.strerror or str(error)
        if error.errno in _TRANSIENT_ERRNOS:
            return TransientRemoteError(f"{where}: {doing} failed: {reason}")
        return RemoteError(f"{where}: {doing} failed: {reason}; check the file's permissions and its file system")

    def _open(self, key: str) -> tuple[int, os.stat_result]:
        path = self._path(key)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as error:
            raise self._error(key, error, "open") from error
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise ObjectNotFound(f"{self._object_url(key)}: not a file, so no object; check the key")
        return fd, st

    def head(self, key: str) -> ObjectInfo:
        """Size, ETag and mtime of ``key``; ``ObjectNotFound`` if it does not exist (or is a directory)."""
        try:
            st = os.stat(self._path(key))
        except OSError as error:
            raise self._error(key, error, "stat") from error
        if not stat.S_ISREG(st.st_mode):
            raise ObjectNotFound(f"{self._object_url(key)}: not a file, so no object; check the key")
        return ObjectInfo(key, st.st_size, file_etag(st), None, st.st_mtime_ns)

    def _read(self, key: str, fd: int, start: int, end: int) -> bytes:
        want = end - start
        parts: list[bytes] = []
        done = 0
        try:
            while done < want:  # one pread nearly always; a pipe-like file system may give less
                chunk = os.pread(fd, want - done, start + done)
                if not chunk:
                    raise TransientRemoteError(f"{self._object_url(key)}: read {done:,} of {want:,} bytes from "
                                               f"offset {start:,} (the file was truncated while being read)")
                parts.append(chunk)
                done += len(chunk)
        except OSError as error:
            raise self._error(key, error, "read") from error
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def get_range(self, key: str, start: int, end: int, *, if_match: str | None = None) -> bytes:
        """Bytes ``[start, end)`` of ``key``.

        With ``if_match``, ``ObjectChanged`` if the file's ETag differs before the read or after it (an
        in-place write during the read); a file replaced by a rename is read whole from the version opened.
        A range past the end of the file is a ``RemoteError``; a read that comes back short, a
        ``TransientRemoteError``.
        """
        _check_range(start, end)
        fd, st = self._open(key)
        try:
            if if_match is not None and file_etag(st) != if_match:
                raise ObjectChanged(f"{self._object_url(key)}: the object changed (ETag {file_etag(st)}, "
                                    f"expected {if_match}); list the objects again to read the new version")
            if end > st.st_size:
                raise RemoteError(f"{self._object_url(key)}: bytes [{start:,}, {end:,}) asked of an object of "
                                  f"{st.st_size:,} bytes; the object is shorter than its listing said")
            data = self._read(key, fd, start, end)
            if if_match is not None:
                after = file_etag(os.fstat(fd))
                if after != if_match:
                    raise ObjectChanged(f"{self._object_url(key)}: the object changed while it was read (ETag "
                                        f"{after}, expected {if_match}); list the objects again to read the new "
                                        f"version")
            return data
        finally:
            os.close(fd)

    def get_range_view(self, key: str, start: int, end: int, *, if_match: str | None = None) -> memoryview:
        """``get_range`` as a ``memoryview`` (the same call as ``ObstoreClient.get_range_view``; no saving here)."""
        return memoryview(self.get_range(key, start, end, if_match=if_match))

    def get(self, key: str) -> bytes:
        """The whole file; ``TransientRemoteError`` if it shrank while being read."""
        fd, st = self._open(key)
        try:
            return self._read(key, fd, 0, st.st_size)
        finally:
            os.close(fd)

    def put(self, key: str, data: bytes) -> None:
        """Replace ``key`` with ``data`` atomically (temporary, fsync, rename, fsync of the directory)."""
        path = self._path(key)
        directory, name = os.path.split(path)
        tmp = os.path.join(directory, f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            os.makedirs(directory, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
            try:
                view = memoryview(data).cast("B")
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as error:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            if error.errno == errno.ENOSPC:
                raise RemoteError(f"{self._object_url(key)}: no space left writing {len(data):,} bytes; free "
                                  f"space on that file system — the old object (if any) is unchanged") from error
            raise self._error(key, error, "write") from error

    def delete(self, key: str) -> None:
        """Remove ``key``; nothing if it is already gone. Emptied directories stay (they are not objects)."""
        try:
            os.unlink(self._path(key))
        except FileNotFoundError:
            pass
        except OSError as error:
            raise self._error(key, error, "delete") from error

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every file whose key starts with ``prefix``, in key order, temporaries included.

        Symbolic links are followed (a linked directory once: a loop is not walked twice); a file that
        disappears while the tree is walked is left out.
        """
        top = prefix.rpartition("/")[0]
        start = self._path(top) if top else self.root   # a prefix's directory part is checked like a key
        found: list[ObjectInfo] = []
        seen: set[tuple[int, int]] = set()
        self._walk(start, top, prefix, found, seen)
        found.sort(key=lambda info: info.key)
        return iter(found)

    def _walk(self, directory: str, key_dir: str, prefix: str, found: list[ObjectInfo],
              seen: set[tuple[int, int]]) -> None:
        try:
            st = os.stat(directory)
            if (st.st_dev, st.st_ino) in seen:
                return
            seen.add((st.st_dev, st.st_ino))
            entries = list(os.scandir(directory))
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as error:
            raise RemoteError(f"{self.url}: cannot list {directory}: {error.strerror}; "
                              "check its permissions") from error
        for entry in entries:
            key = f"{key_dir}/{entry.name}" if key_dir else entry.name
            if not (key.startswith(prefix) or prefix.startswith(key + "/")):
                continue
            try:
                st = entry.stat()
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode):
                self._walk(entry.path, key, prefix, found, seen)
            elif stat.S_ISREG(st.st_mode) and key.startswith(prefix):
                found.append(ObjectInfo(key, st.st_size, file_etag(st), None, st.st_mtime_ns))
