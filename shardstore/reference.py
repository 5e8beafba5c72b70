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


def expand_epoch(starts: np.ndarray, counts: np.ndarray, source: np.ndarray | None = None) -> np.ndarray:
    """Global ids of an epoch's visited shards, each read front to back (see ``shardstore.kernels``)."""
    starts = np.asarray(starts, dtype=np.int64)
    counts = np.asarray(counts, dtype=np.int64)
    if source is None:
        parts = [np.arange(s, s + c, dtype=np.int64) for s, c in zip(starts, counts)]
        return np.concatenate(parts) if parts else np.empty(0, np.int64)
    source = np.asarray(source, dtype=np.int64)
    out = np.empty(source.size, dtype=np.int64)
    for j in range(starts.size):
        where = np.flatnonzero(source == j)  # positions fed by shard j, in order: rows 0, 1, 2, ...
        out[where] = starts[j] + np.arange(where.size)
    return out


def split_rank(order: np.ndarray, rank: int, world_size: int, batch_size: int,
               start_batch: int, num_batches: int) -> np.ndarray:
    """This rank's contiguous slice of each global batch (see ``shardstore.kernels``)."""
    g = world_size * batch_size
    batches = np.asarray(order, dtype=np.int64)[start_batch * g : (start_batch + num_batches) * g]
    return batches.reshape(num_batches, world_size, batch_size)[:, rank].reshape(-1).copy()


def gather_rows(sources: list[np.ndarray], source_index: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
    """``out[i] = sources[source_index[i]][rows[i]]``, one row at a time (see ``shardstore.kernels``)."""
    for i, (j, r) in enumerate(zip(np.asarray(source_index), np.asarray(rows))):
        out[i] = sources[int(j)][int(r)]
