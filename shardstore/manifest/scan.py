"""Reading each candidate file for a manifest build: its header, through the one inside-the-root check, against the old manifest."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shardstore.errors import ManifestError
from shardstore.manifest.checksum import fd_checksum
from shardstore.store.manifest import FileEntry
from shardstore.store.manifest_json import CHECKSUM
from shardstore.store.snapshot import manifest_path, read_manifest
from shardstore.store.layout import OUTSIDE_ROOT_FIX, OutsideRootError, open_within
from shardstore.store.npy import NotNpyError, NpyHeader, header_problem, read_head_fd, read_header_bytes

log = logging.getLogger(__name__)

#: label-like files up to this size get their value range recorded (2,048 int64 labels are 16 KB)
LABEL_RANGE_BYTES = 8 << 20


@dataclass(frozen=True)
class FileInfo:
    """A field file that passed the per-file checks: its manifest entry and what its header says."""

    entry: FileEntry
    dtype: np.dtype
    shape: tuple[int, ...]
    #: same size and mtime as in the previous manifest (its checksum carried over)
    unchanged: bool = False


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


class Scan:
    """Reads each candidate file's header (through the one inside-the-root check) against the previous manifest."""

    def __init__(self, root: Path, previous: dict[str, FileEntry]) -> None:
        self.root = str(root)
        self.resolved_root = os.path.realpath(root)
        self.previous = previous
        self.changed: list[tuple[str, str]] = []  # (path, why) of files whose recorded checksum no longer holds

    def read(self, rel: str) -> FileInfo | str | None:
        """``FileInfo`` if good, a reason if bad, None if the file vanished meanwhile."""
        path = os.path.join(self.root, rel)
        try:
            fd = open_within(self.resolved_root, path, rel, parents_checked=True)
        except FileNotFoundError:
            return None
        except OutsideRootError as exc:
            return f"resolves to {exc.real}, outside the cache root; {OUTSIDE_ROOT_FIX}"
        except OSError as exc:
            return f"cannot be read ({one_line(exc)})"
        try:
            try:
                head, st = read_head_fd(fd)  # st describes the file that was read, even if it is replaced meanwhile
            except OSError as exc:
                return f"cannot be read ({one_line(exc)})"
            try:
                header = read_header_bytes(head)
            except NotNpyError as exc:
                return str(exc)
            except Exception as exc:  # noqa: BLE001 - any parse failure of foreign bytes is a bad shard, never a crash
                return f"unreadable .npy header ({one_line(exc)})"
            reason = header_problem(header, st.st_size)
            if reason is not None:
                return reason
            checksum, unchanged = self._checksum(rel, fd, st)
            try:
                value_range = label_range(fd, header)
            except OSError as exc:
                return f"cannot be read ({one_line(exc)})"
        finally:
            os.close(fd)
        entry = FileEntry(rel, st.st_size, st.st_mtime_ns, header.data_offset, checksum, value_range)
        return FileInfo(entry, header.dtype, header.shape, unchanged)

    def _checksum(self, rel: str, fd: int, st: os.stat_result) -> tuple[str | None, bool]:
        """The checksum the new entry carries, and whether the file is unchanged since the previous manifest.

        A checksum is never dropped because a file changed: a changed file with a recorded
        checksum is hashed again; if the content differs, the old checksum stays (so
        ``verify`` fails on it) and the file is reported, until it is restored or the new
        content is accepted by a full rebuild.
        """
        old = self.previous.get(rel)
        if old is None:
            return None, False
        if old.bytes == st.st_size and old.mtime_ns == st.st_mtime_ns:
            return old.checksum, True
        if old.checksum is None:
            return None, False
        if old.bytes != st.st_size:
            self.changed.append((rel, f"changed size since its checksum was recorded ({old.bytes:,} -> {st.st_size:,} bytes)"))
            return old.checksum, False
        digest = fd_checksum(fd)
        if digest != old.checksum:
            self.changed.append((rel, f"content changed since its checksum was recorded "
                                      f"(manifest {old.checksum[:23]}..., file {digest[:23]}...)"))
        return old.checksum, False


def label_range(fd: int, header: NpyHeader) -> tuple[int, int] | None:
    """Smallest and largest value of a label-like file (integers, one per sample, at most ``LABEL_RANGE_BYTES``).

    Read at every build (never carried over from the previous manifest): a few KB per shard,
    which lets training check labels against ``num_classes`` before its first step without
    reading every label file of a large cache. Other fields, and empty files, get None.
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


@dataclass
class Previous:
    """What a build takes from the existing manifest: which files are unchanged, their checksums, shard history."""

    files: dict[str, FileEntry]
    #: the generation that first listed each shard id (kept across builds)
    since: dict[int, int]
    generation: int = -1


def previous_manifest(root: Path) -> Previous:
    """File entries of the existing manifest by path, and each shard's ``since`` (empty if there is none).

    Only what says whether a file changed (size, mtime) and its checksum are used from
    it; dtype, shape, rows and offsets always come from the file's own header. A manifest
    that fails validation still lends the checksums of its well-formed file entries (format
    1 and 2 JSON): a recorded checksum can only make ``verify`` stricter, and dropping them all
    because one value was edited would let any change through unnoticed.
    """
    path = manifest_path(root)
    if not path.exists():
        return Previous({}, {})
    try:
        old = read_manifest(root)
    except ManifestError as exc:
        try:
            salvaged = _salvage(path.read_text())
        except (OSError, UnicodeDecodeError):
            salvaged = {}
        log.warning("ignoring the existing manifest (every header is read again; %d recorded checksums kept): %s",
                    sum(f.checksum is not None for f in salvaged.values()), one_line(exc))
        return Previous(salvaged, {})
    files = {f.path: f for shard in old.shards for f in shard.files.values()}
    since = dict(zip(old.ids.tolist(), old.columns["since"].tolist()))
    return Previous(files, since, old.generation)


def previous_files(root: Path) -> dict[str, FileEntry]:
    """File entries of the existing manifest by path (see ``previous_manifest``)."""
    return previous_manifest(root).files


def _salvage(text: str) -> dict[str, FileEntry]:
    """Well-formed (path, bytes, mtime, checksum) entries of a manifest that failed validation; the first of a path wins."""
    out: dict[str, FileEntry] = {}
    try:
        doc = json.loads(text)
        for shard in doc["shards"]:
            for f in shard["files"].values():
                rel, size, mtime, digest = f["path"], f["bytes"], f["mtime_ns"], f.get("checksum")
                if (isinstance(rel, str) and type(size) is int and type(mtime) is int and isinstance(digest, str)
                        and CHECKSUM.match(digest) and rel not in out):
                    out[rel] = FileEntry(rel, size, mtime, 0, digest)
    except Exception:  # noqa: BLE001 - whatever else it holds, the entries found so far are kept
        pass
    return out
