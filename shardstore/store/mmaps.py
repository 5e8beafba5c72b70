"""A bounded, thread-safe cache of read-only memory maps of shard field files (zero copy)."""

from __future__ import annotations

import mmap
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from shardstore.errors import CorruptShardError


def map_array(path: Path, dtype: np.dtype, shape: tuple[int, ...], offset: int) -> np.ndarray:
    """Map the array stored at ``offset`` of ``path`` read-only; its pages load on first touch."""
    count = int(np.prod(shape, dtype=np.int64))
    need = offset + count * dtype.itemsize
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size < need:
                raise CorruptShardError(
                    f"{path}: file has {size:,} bytes, the manifest promises {need:,} (truncated since the "
                    "manifest was built); rebuild it with `shardstore build-manifest`"
                )
            if count == 0:
                out = np.empty(shape, dtype=dtype)
                out.flags.writeable = False
                return out
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except FileNotFoundError as exc:
        raise CorruptShardError(
            f"{path}: file listed in the manifest has vanished; rebuild it with `shardstore build-manifest`"
        ) from exc
    # The array keeps the mmap alive through its base; closing the file does not unmap it.
    return np.frombuffer(mm, dtype=dtype, count=count, offset=offset).reshape(shape)


class MapCache:
    """Keeps at most ``max_open`` maps; the least recently used is dropped first.

    Dropping a map only releases this cache's reference: arrays already handed out
    stay valid, and the kernel unmaps the file once the last of them is gone.
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
