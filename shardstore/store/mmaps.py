"""Opening shard field files: a bounded, thread-safe cache of read-only memory maps (zero copy, no descriptors
held), and files opened for reading with ``pread``."""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from shardstore import kernels
from shardstore.errors import CorruptShardError
from shardstore.store.layout import OutsideRootError, open_within

if TYPE_CHECKING:
    from shardstore.store.reader import ShardStore

log = logging.getLogger("shardstore.store.reader")  # the logger ShardStore warns through


def _open_checked(path: Path, need: int, resolved_root: str | None, rel: str | None) -> tuple[int, os.stat_result]:
    """Open ``path`` read-only and check it holds exactly ``need`` bytes; ``CorruptShardError`` naming it if not.

    The caller owns the descriptor returned.
    """
    fix = "rebuild the manifest with `shardstore build-manifest`"
    try:
        if resolved_root is None:
            fd = os.open(path, os.O_RDONLY)
        else:
            fd = open_within(resolved_root, path, rel)
    except FileNotFoundError as exc:
        raise CorruptShardError(f"{path}: file listed in the manifest has vanished; restore it, or {fix}") from exc
    except OutsideRootError as exc:
        raise CorruptShardError(f"{exc}; then {fix}") from None
    except OSError as exc:
        raise CorruptShardError(f"{path}: cannot be opened ({exc.strerror or exc}); {fix}") from None
    try:
        st = os.fstat(fd)
        if st.st_size != need:
            raise CorruptShardError(
                f"{path}: file has {st.st_size:,} bytes, the manifest promises {need:,} (changed since the "
                f"manifest was built); restore it, or {fix}"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def map_array(path: Path, dtype: np.dtype, shape: tuple[int, ...], offset: int, *,
              resolved_root: str | None = None, rel: str | None = None,
              expected_bytes: int | None = None) -> tuple[np.ndarray, os.stat_result]:
    """Map the array stored at ``offset`` of ``path`` read-only; its pages load on first touch.

    This is where a file is checked against the manifest: it must exist, lie inside the
    root (``resolved_root``: a symlink out of it is refused, never followed) and have exactly
    ``expected_bytes`` (its header plus its rows); otherwise a ``CorruptShardError`` names it.
    The ``fstat`` of the descriptor opened anyway is the whole cost. The descriptor is closed
    once the file is mapped: a loader that maps thousands of files must not hold thousands.
    Returns the array and the file's stat.
    """
    count = int(np.prod(shape, dtype=np.int64))
    need = offset + count * dtype.itemsize if expected_bytes is None else expected_bytes
    fd, st = _open_checked(path, need, resolved_root, rel)
    try:
        if count == 0:
            out = np.empty(shape, dtype=dtype)
            out.flags.writeable = False
            return out, st
        mapping = kernels.map_file(fd, st.st_size, str(path))
    finally:
        os.close(fd)
    # The array keeps the map alive through its base; it is unmapped when the last view is gone.
    return np.frombuffer(mapping, dtype=dtype, count=count, offset=offset).reshape(shape), st


def open_rows(path: Path, dtype: np.dtype, shape: tuple[int, ...], offset: int, *,
              resolved_root: str | None = None, rel: str | None = None,
              expected_bytes: int | None = None) -> tuple[kernels.FileRows, os.stat_result]:
    """Open the array stored at ``offset`` of ``path`` for reading with ``pread`` (see ``kernels.FileRows``).

    Checked exactly as ``map_array`` checks a file; the caller owns the descriptor (a
    ``BatchGather`` closes it when it lets go of the shard). Returns the rows and the file's stat.
    """
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    need = offset + nbytes if expected_bytes is None else expected_bytes
    fd, st = _open_checked(path, need, resolved_root, rel)
    return kernels.FileRows(fd, offset, nbytes, st.st_size, str(path)), st


def field_rows(store: ShardStore, position: int, field: str) -> np.ndarray | kernels.FileRows:
    """``field`` of the shard at ``position`` for a gather: the store's map when it holds one, else the open file.

    A map the store already holds has most likely been read through in this process, so its
    pages are mapped in and copying from it is fastest. Any other file is opened for
    ``pread``, checked exactly as ``ShardStore.field`` checks a file it maps (a
    ``CorruptShardError`` naming it otherwise); the caller owns its descriptor.
    """
    m = store.manifest
    spec = m.fields.get(field)
    offset = int(m.columns[f"{field}.offset"][position]) if spec is not None and 0 <= position < m.num_shards else 0
    if not offset:
        return store.field(position, field)  # raises the error that says what is missing
    rel = m.file_path(position, field)
    path = store.root / rel
    mapped = store._maps.peek(path)
    if mapped is not None:
        return mapped
    store.fetch(position)
    rows, st = open_rows(path, spec.dtype, (int(m.counts[position]), *spec.shape), offset,
                         resolved_root=store._resolved_root, rel=rel, expected_bytes=m.file_bytes(position, field))
    if st.st_mtime_ns != int(m.columns[f"{field}.mtime_ns"][position]) and not store._touched_warned:
        store._touched_warned = True
        log.warning("%s has a new mtime but the size the manifest records; rebuild the manifest if shard "
                    "files changed (`shardstore build-manifest %s`)", path, store.root)
    return rows


def shrunk_error(path: Path, expected_bytes: int, *, mapped: bool = True) -> CorruptShardError:
    """The error for a file that shrank while it was read: its map faulted (SIGBUS caught) or, with
    ``mapped=False``, a read of the open file ended early."""
    try:
        now = f"shrank to {os.stat(path).st_size:,} bytes"
    except OSError:
        now = "was removed or replaced"
    how = "mapped" if mapped else "open"
    return CorruptShardError(
        f"{path}: file {now} while {how} (expected {expected_bytes:,}); it was truncated or rewritten while "
        "being read: restore it (or rewrite its shard), then rebuild the manifest with `shardstore build-manifest`"
    )


class MapCache:
    """Keeps at most ``max_open`` maps; the least recently used is dropped first.

    Dropping a map only releases this cache's reference: arrays already handed out
    stay valid, and the file is unmapped once the last of them is gone. No map holds a
    file descriptor.
    """

    def __init__(self, max_open: int = 64, on_drop: Callable[[object], None] | None = None) -> None:
        if max_open < 1:
            raise ValueError(f"max_open must be at least 1, got {max_open}")
        self.max_open = max_open
        self._maps: OrderedDict[Path, np.ndarray] = OrderedDict()
        self._tags: dict[Path, object] = {}
        self._on_drop = on_drop  # called with a map's tag when the cache lets go of it
        self._lock = threading.Lock()

    def get(self, path: Path, make: Callable[[], np.ndarray], tag: object = None) -> np.ndarray:
        """The read-only array of ``path``, from ``make()`` (which maps the file) if it is not mapped yet.

        ``tag`` is handed to ``on_drop`` when this map is dropped (a remote store unpins its shard).
        """
        with self._lock:
            arr = self._maps.get(path)
            if arr is not None:
                self._maps.move_to_end(path)
                return arr
        arr = make()
        dropped = []
        with self._lock:
            if path in self._maps and tag is not None:
                dropped.append(tag)  # mapped twice at once: the second map's pin is let go
            self._maps[path] = arr
            self._maps.move_to_end(path)
            if tag is not None:
                self._tags[path] = tag
            while len(self._maps) > self.max_open:
                old, _ = self._maps.popitem(last=False)
                if old in self._tags:
                    dropped.append(self._tags.pop(old))
        if self._on_drop is not None:
            for t in dropped:
                self._on_drop(t)
        return arr

    def peek(self, path: Path) -> np.ndarray | None:
        """The array of ``path`` if it is mapped now (and marked recently used), else None; never maps."""
        with self._lock:
            arr = self._maps.get(path)
            if arr is not None:
                self._maps.move_to_end(path)
            return arr

    def discard(self, path: Path) -> None:
        """Forget the map of ``path`` if it is held (arrays handed out stay valid)."""
        with self._lock:
            arr = self._maps.pop(path, None)
            tag = self._tags.pop(path, None)
        if arr is not None and tag is not None and self._on_drop is not None:
            self._on_drop(tag)

    def __len__(self) -> int:
        return len(self._maps)

    def __getstate__(self) -> dict:
        # Sent to a spawned DataLoader worker: it maps the files again on its own.
        return {"max_open": self.max_open}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["max_open"])

    def clear(self) -> None:
        """Forget every map."""
        with self._lock:
            self._maps.clear()
            dropped = list(self._tags.values())
            self._tags.clear()
        if self._on_drop is not None:
            for t in dropped:
                self._on_drop(t)
