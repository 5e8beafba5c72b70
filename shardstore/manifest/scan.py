"""Reading a candidate file for a manifest build: its header, through the inside-the-root check, against the old table.

Shards read in bulk (``bulk.py``) are read by a compiled loop and only their distinct
headers come here (``parsed``); a shard with anything odd, the spot check and every file
whose checksum may need hashing are read here one file at a time: one ``open``, ``fstat``,
``pread`` and ``close`` per file, through the one inside-the-root check, and no data read
beyond the first page except the labels of a label-like file too large for it.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np

from shardstore.manifest.checksum import fd_checksum
from shardstore.store.layout import OutsideRootError, open_within
from shardstore.store.manifest import FileEntry
from shardstore.store.npy import (
    HEAD_BYTES,
    MAX_HEADER_BYTES,
    NotNpyError,
    NpyHeader,
    header_problem,
    read_header_bytes,
)

#: label-like files up to this size get their value range recorded (2,048 int64 labels are 16 KB)
LABEL_RANGE_BYTES = 8 << 20

_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class FileStat(NamedTuple):
    """What a build uses of a file's ``fstat`` (``os.stat_result`` has the same attributes)."""

    st_size: int
    st_mtime_ns: int
    st_mode: int


class Lent(NamedTuple):
    """What the previous manifest recorded for a file."""

    bytes: int | None  # None: not recorded (the row lacks the file, yet holds its checksum)
    mtime_ns: int
    checksum: str | None
    #: False: from a refused table, whose rows may be attributed to the wrong files; used only while the
    #: file still has this size and mtime
    strict: bool = True


#: ``lend(rel, shard_id, field)``: what the previous manifest recorded for a file, or None
Lender = Callable[[str, int, str], "Lent | None"]


class FileInfo:
    """A field file that passed the per-file checks: what its header says and what the manifest records for it."""

    __slots__ = ("checksum", "header", "mtime_ns", "rel", "size", "unchanged", "value_range")

    def __init__(self, rel: str, size: int, mtime_ns: int, header: NpyHeader, checksum: str | None,
                 value_range: tuple[int, int] | None, unchanged: bool) -> None:
        self.rel = rel
        self.size = size
        self.mtime_ns = mtime_ns
        self.header = header
        self.checksum = checksum
        self.value_range = value_range
        #: same size and mtime as in the previous manifest (its checksum carried over)
        self.unchanged = unchanged

    @property
    def dtype(self) -> np.dtype:
        return self.header.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.header.shape

    @property
    def entry(self) -> FileEntry:
        return FileEntry(self.rel, self.size, self.mtime_ns, self.header.data_offset, self.checksum, self.value_range)


def read_head(fd: int, size: int) -> bytes:
    """The first page of the open file ``fd`` of ``size`` bytes (more for a header beyond a page)."""
    head = os.pread(fd, HEAD_BYTES, 0)
    if len(head) == HEAD_BYTES and HEAD_BYTES < size:
        head += os.pread(fd, MAX_HEADER_BYTES + 16 - HEAD_BYTES, HEAD_BYTES)
    return head


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


class _Parsed:
    """One distinct header: parsed once, with what it alone says against a field (shards share a few headers)."""

    __slots__ = ("file_bytes", "header", "label_slice", "problem")

    def __init__(self, header: NpyHeader) -> None:
        self.header = header
        self.file_bytes = header.file_bytes
        self.problem = header_problem(header, self.file_bytes)  # objects, structured, 0-d, Fortran order
        label_like = header.dtype.kind in "iu" and header.shape[1:] in ((), (1,))
        #: where the labels of a label-like file lie ((0, 0): not label-like, or none to record)
        ok = label_like and 0 < header.data_bytes <= LABEL_RANGE_BYTES
        self.label_slice = (header.data_offset, self.file_bytes) if ok else (0, 0)


class Scan:
    """Reads each candidate file's header (through the one inside-the-root check) against the previous manifest.

    ``headers_read`` counts the files whose first page was read; ``reused`` those whose size and
    mtime are the previous manifest's (their checksum carries over).
    """

    def __init__(self, root: Path, root_fd: int, lend: Lender | None = None) -> None:
        self.root = str(root)
        self.root_fd = root_fd
        self.resolved_root = os.path.realpath(root)
        self.lend = lend
        self.changed: list[tuple[str, str]] = []  # (path, why) of files whose recorded checksum no longer holds
        self.headers_read = 0
        self.reused = 0
        self._headers: dict[bytes, _Parsed] = {}
        #: label-like files whose labels were in the page read, with those bytes (see ``label_ranges``)
        self.labels: list[tuple[FileInfo, bytes]] = []

    def _open(self, rel: str) -> int:
        # The directories above ``rel`` were checked by discovery; only a link in the last component
        # (refused by O_NOFOLLOW) needs the full resolution.
        try:
            return os.open(rel, _OPEN_FLAGS, dir_fd=self.root_fd)
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
        return open_within(self.resolved_root, os.path.join(self.root, rel), rel)

    def _parse(self, head: bytes) -> _Parsed:
        """The parsed header at the start of ``head`` (``ValueError`` and ``NotNpyError`` as ``read_header_bytes``)."""
        if head[6:8] == b"\x01\x00" and len(head) >= 10:
            key = head[: 10 + int.from_bytes(head[8:10], "little")]
        elif head[6:8] == b"\x02\x00" and len(head) >= 12:
            key = head[: 12 + int.from_bytes(head[8:12], "little")]
        else:
            key = b""
        parsed = self._headers.get(key) if key else None
        if parsed is None:
            parsed = _Parsed(read_header_bytes(head))
            if key and len(self._headers) < 4096:
                self._headers[key] = parsed
        return parsed

    def read(self, rel: str, shard_id: int, field: str, *,
             lend: bool = True) -> FileInfo | str | OutsideRootError | None:
        """``FileInfo`` if good, a reason if bad, the error for a link out of the root, None if the file is not there.

        With ``lend`` (and a previous manifest) the entry carries the recorded checksum (see ``_checksum``).
        """
        try:
            fd = self._open(rel)
        except FileNotFoundError:
            return None
        except OutsideRootError as exc:
            return exc
        except OSError as exc:
            return f"cannot be read ({exc.strerror or one_line(exc)})"
        try:
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    return "cannot be read (not a regular file)"
                head = read_head(fd, st.st_size)  # st describes the file read, even if it is replaced meanwhile
            except OSError as exc:
                return f"cannot be read ({exc.strerror or one_line(exc)})"
            self.headers_read += 1
            return self.examine(rel, shard_id, field, st, head, fd, lend=lend)
        finally:
            os.close(fd)

    def parsed(self, head: bytes) -> _Parsed | str:
        """The parsed header at the start of ``head``, or why it is not one."""
        try:
            return self._parse(head)
        except NotNpyError as exc:
            return str(exc)
        except Exception as exc:  # noqa: BLE001 - any parse failure of foreign bytes is a bad shard, never a crash
            return f"unreadable .npy header ({one_line(exc)})"

    def examine(self, rel: str, shard_id: int, field: str, st: os.stat_result | FileStat, head: bytes,
                fd: int | None = None, *, lend: bool = True) -> FileInfo | str:
        """The checks of ``read`` on a file already read (its stat and first bytes); ``fd`` if it is still open."""
        parsed = self.parsed(head)
        if isinstance(parsed, str):
            return parsed
        header = parsed.header
        size = st.st_size
        if parsed.problem is not None:
            return parsed.problem
        if size != parsed.file_bytes:
            return header_problem(header, size)
        checksum, unchanged = None, False
        start, end = parsed.label_slice
        need_fd = (lend and self.lend is not None) or end > len(head)
        own_fd = fd is None and need_fd
        if own_fd:
            try:
                fd = self._open(rel)
            except (OSError, OutsideRootError) as exc:
                return f"cannot be read ({getattr(exc, 'strerror', None) or one_line(exc)})"
        try:
            if lend and self.lend is not None:
                checksum, unchanged = self._checksum(rel, shard_id, field, fd, st)  # type: ignore[arg-type]
            info = FileInfo(rel, size, st.st_mtime_ns, header, checksum, None, unchanged)
            if end:
                if end <= len(head):
                    self.labels.append((info, head[start:end]))  # ranges are computed in bulk (label_ranges)
                else:
                    try:
                        info.value_range = label_range(fd, header)  # type: ignore[arg-type]
                    except OSError as exc:
                        return f"cannot be read ({exc.strerror or one_line(exc)})"
        finally:
            if own_fd:
                os.close(fd)  # type: ignore[arg-type]
        return info

    def label_ranges(self) -> None:
        """Set the value range of every label-like file read since the last call, in one pass per header."""
        groups: dict[tuple[np.dtype, int], list[tuple[FileInfo, bytes]]] = {}
        for info, data in self.labels:
            groups.setdefault((info.header.dtype, len(data)), []).append((info, data))
        self.labels = []
        for (dtype, nbytes), items in groups.items():
            values = np.frombuffer(b"".join(d for _, d in items), dtype).reshape(len(items), nbytes // dtype.itemsize)
            low, high = values.min(axis=1), values.max(axis=1)
            for (info, _), lo, hi in zip(items, low.tolist(), high.tolist()):
                info.value_range = (lo, hi) if -(2**63) <= lo and hi < 2**63 else None  # uint64 beyond int64


    def _checksum(self, rel: str, shard_id: int, field: str, fd: int,
                  st: os.stat_result | FileStat) -> tuple[str | None, bool]:
        """The checksum the new entry carries, and whether the file is unchanged since the previous manifest.

        A checksum is never dropped because a file changed: a changed file with a recorded
        checksum is hashed again; if the content differs, the old checksum stays (so
        ``verify`` fails on it) and the file is reported, until it is restored or the new
        content is accepted by a full rebuild.
        """
        assert self.lend is not None
        old = self.lend(rel, shard_id, field)
        if old is None:
            return None, False
        if old.bytes == st.st_size and old.mtime_ns == st.st_mtime_ns:
            self.reused += 1
            return old.checksum, True
        if old.checksum is None or not old.strict:
            return None, False
        if old.bytes is not None and old.bytes != st.st_size:
            self.changed.append((rel, "changed size since its checksum was recorded "
                                      f"({old.bytes:,} -> {st.st_size:,} bytes)"))
            return old.checksum, False
        digest = fd_checksum(fd)
        if digest != old.checksum:
            self.changed.append((rel, f"content changed since its checksum was recorded "
                                      f"(manifest {old.checksum[:23]}..., file {digest[:23]}...)"))
        return old.checksum, False


def label_range(fd: int, header: NpyHeader) -> tuple[int, int] | None:
    """Smallest and largest value of a label-like file (integers, one per sample, at most ``LABEL_RANGE_BYTES``).

    Read at every build that reads the file's header (usually the labels lie inside the page
    already read, and ``Scan.label_ranges`` does this for many files at once), which lets
    training check labels against ``num_classes`` before its first step without reading every
    label file of a large cache. Other fields, and empty files, get None.
    """
    label_like = header.dtype.kind in "iu" and header.shape[1:] in ((), (1,))
    if not label_like or not 0 < header.data_bytes <= LABEL_RANGE_BYTES:
        return None
    data = os.pread(fd, header.data_bytes, header.data_offset)
    if len(data) != header.data_bytes:  # shrunk since its size was checked: the shard is rescanned next build
        return None
    values = np.frombuffer(data, dtype=header.dtype)
    low, high = int(values.min()), int(values.max())
    return (low, high) if -(2**63) <= low and high < 2**63 else None  # uint64 beyond int64: not recorded
