"""A bounded, thread-safe cache of read-only memory maps of shard field files (zero copy, no descriptors held)."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from shardstore import kernels
from shardstore.errors import CorruptShardError


def map_array(path: Path, dtype: np.dtype, shape: tuple[int, ...], offset: int) -> np.ndarray:
    """Map the array stored at ``offset`` of ``path`` read-only; its pages load on first touch.

    The file's descriptor is closed as soon as the file is mapped: a map does not need it,
    and a loader that maps thousands of files must not hold thousands of descriptors.
    """
    count = int(np.prod(shape, dtype=np.int64))
    need = offset + count * dtype.itemsize
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < need:
                raise CorruptShardError(
                    f"{path}: file has {size:,} bytes, the manifest promises {need:,} (truncated since the "
                    "manifest was built); rebuild it with `shardstore build-manifest`"
                )
            if count == 0:
                out = np.empty(shape, dtype=dtype)
                out.flags.writeable = False
                return out
            mapping = kernels.map_file(f.fileno(), size, str(path))
    except FileNotFoundError as exc:
        raise CorruptShardError(
            f"{path}: file listed in the manifest has vanished; rebuild it with `shardstore build-manifest`"
        ) from exc
    # The array keeps the map alive through its base; it is unmapped when the last view is gone.
    return np.frombuffer(mapping, dtype=dtype, count=count, offset=offset).reshape(shape)


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

    def get(self, path: Path, dtype: np.dtype, shape: tuple[int, ...], offset: int) -> np.ndarray:
        """The read-only array of ``path``, mapping the file if it is not mapped yet."""
        with self._lock:
            arr = self._maps.get(path)
            if arr is not None:
                self._maps.move_to_end(path)
                return arr
        arr = map_array(path, dtype, shape, offset)
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
