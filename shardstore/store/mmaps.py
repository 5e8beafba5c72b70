"""A bounded, thread-safe cache of read-only memory maps of shard field files (zero copy, no descriptors held)."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np

from shardstore import kernels
from shardstore.errors import CorruptShardError
from shardstore.store.layout import OutsideRootError, open_within


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
        if count == 0:
            out = np.empty(shape, dtype=dtype)
            out.flags.writeable = False
            return out, st
        mapping = kernels.map_file(fd, st.st_size, str(path))
    finally:
        os.close(fd)
    # The array keeps the map alive through its base; it is unmapped when the last view is gone.
    return np.frombuffer(mapping, dtype=dtype, count=count, offset=offset).reshape(shape), st


def shrunk_error(path: Path, expected_bytes: int) -> CorruptShardError:
    """The error for a file whose map faulted (SIGBUS caught): it was truncated or rewritten while mapped."""
    try:
        now = f"shrank to {os.stat(path).st_size:,} bytes"
    except OSError:
        now = "was removed or replaced"
    return CorruptShardError(
        f"{path}: file {now} while mapped (expected {expected_bytes:,}); it was truncated or rewritten while "
        "being read: restore it (or rewrite its shard), then rebuild the manifest with `shardstore build-manifest`"
    )


class MapCache:
    """Keeps at most ``max_open`` maps; the least recently used is dropped first.

    Dropping a map only releases this cache's reference: arrays already handed out
    stay valid, and the file is unmapped once the last of them is gone. No map holds a
    file descriptor.
    """

    def __init__(self, max_open: int = 64) -> None:
        if max_open < 1:
            raise ValueError(f"max_open must be at least 1, got {max_open}")
        self.max_open = max_open
        self._maps: OrderedDict[Path, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: Path, make: Callable[[], np.ndarray]) -> np.ndarray:
        """The read-only array of ``path``, from ``make()`` (which maps the file) if it is not mapped yet."""
        with self._lock:
            arr = self._maps.get(path)
            if arr is not None:
                self._maps.move_to_end(path)
                return arr
        arr = make()
        with self._lock:
            self._maps[path] = arr
            self._maps.move_to_end(path)
            while len(self._maps) > self.max_open:
                self._maps.popitem(last=False)
        return arr

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
