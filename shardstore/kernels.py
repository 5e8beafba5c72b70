"""The only importer of the compiled ``cshard`` module: argument checks in Python, loops in Cython."""

from __future__ import annotations

import numpy as np

try:
    from cshard import _kernels
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "shardstore's compiled extension is not built; run `pip install -e .` "
        f"(with a C compiler, Cython and NumPy available) and check its output ({exc})"
    ) from exc


def _int64_vector(name: str, value: np.ndarray) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray of int64, got {type(value).__name__}")
    if value.dtype != np.int64 or value.ndim != 1:
        raise TypeError(f"{name} must be a 1-D int64 array, got {value.ndim}-D {value.dtype}")
    return np.ascontiguousarray(value)


def locate_rows(sample_ids: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(shard_position, row)`` for each global sample id.

    ``offsets[p]`` is the global id of shard position ``p``'s first sample and
    ``offsets[-1]`` the total sample count. Raises ``IndexError`` for ids out of range.
    """
    ids = _int64_vector("sample_ids", sample_ids)
    offs = _int64_vector("offsets", offsets)
    if offs.size == 0:
        raise ValueError("offsets must hold at least the total count (one entry)")
    shard_position = np.empty(ids.size, dtype=np.int64)
    row = np.empty(ids.size, dtype=np.int64)
    bad = _kernels.locate_rows(ids, offs, shard_position, row)
    if bad:
        first = int(ids[shard_position < 0][0])
        raise IndexError(f"sample id {first} is out of range [0, {int(offs[-1])}) ({bad} ids out of range)")
    return shard_position, row


def expand_epoch(starts: np.ndarray, counts: np.ndarray, source: np.ndarray | None = None) -> np.ndarray:
    """Global sample ids of an epoch, its visited shards each read front to back.

    ``starts``/``counts``: first global id and sample count of each visited shard, in
    visit order. ``source`` (optional): for each output position, the index of the
    visited shard that supplies its next row; None concatenates the shards in order.
    """
    starts = _int64_vector("starts", starts)
    counts = _int64_vector("counts", counts)
    if starts.size != counts.size:
        raise ValueError(f"starts and counts differ in length ({starts.size} vs {counts.size})")
    if counts.size and counts.min() < 0:
        raise ValueError("counts must be non-negative")
    total = int(counts.sum())
    out = np.empty(total, dtype=np.int64)
    if source is None:
        src = np.empty(0, dtype=np.int64)
    else:
        src = _int64_vector("source", source)
        if src.size != total:
            raise ValueError(f"source has {src.size} entries, the shards {total} samples")
        if total and (src.min() < 0 or src.max() >= counts.size):
            raise ValueError("source names a shard that is not visited")
        if not np.array_equal(np.bincount(src, minlength=counts.size), counts):
            raise ValueError("source must name each visited shard exactly as often as its sample count")
    _kernels.expand_epoch(starts, counts, src, out)
    return out


def split_rank(order: np.ndarray, rank: int, world_size: int, batch_size: int,
               start_batch: int, num_batches: int) -> np.ndarray:
    """This rank's sample ids for global batches ``start_batch .. start_batch + num_batches``.

    Global batch ``b`` is ``order[b*G:(b+1)*G]`` with ``G = world_size * batch_size``; rank
    ``r`` reads its contiguous slice ``[r*batch_size, (r+1)*batch_size)`` of each.
    """
    order = _int64_vector("order", order)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, {world_size})")
    if batch_size < 1 or start_batch < 0 or num_batches < 0:
        raise ValueError("batch_size must be >= 1, start_batch and num_batches >= 0")
    if (start_batch + num_batches) * world_size * batch_size > order.size:
        raise ValueError(f"{start_batch + num_batches} global batches of {world_size * batch_size} exceed "
                         f"the epoch's {order.size} samples")
    out = np.empty(num_batches * batch_size, dtype=np.int64)
    _kernels.split_rank(order, rank, world_size, batch_size, start_batch, out)
    return out
