"""NumPy twins of the compiled kernels: readable, slow, and the specification the kernels are tested against."""

from __future__ import annotations

import numpy as np


def locate_rows(sample_ids: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(shard_position, row)`` for each global sample id (see ``shardstore.kernels``)."""
    ids = np.asarray(sample_ids, dtype=np.int64)
    offs = np.asarray(offsets, dtype=np.int64)
    total = int(offs[-1])
    if ids.size and (ids.min() < 0 or ids.max() >= total):
        raise IndexError(f"sample id out of range [0, {total})")
    shard_position = np.searchsorted(offs[:-1], ids, side="right").astype(np.int64) - 1
    return shard_position, ids - offs[shard_position]
