"""The only importer of the compiled ``cshard`` module: argument checks in Python, loops in Cython."""

from __future__ import annotations

import mmap
import os
import threading

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


def _row_bytes(name: str, arr: np.ndarray) -> int:
    if not arr.flags.c_contiguous:
        raise TypeError(f"{name} must be C-contiguous")
    if arr.ndim < 1:
        raise TypeError(f"{name} must have a leading row axis, got a 0-d array")
    return int(arr.dtype.itemsize * np.prod(arr.shape[1:], dtype=np.int64))


def _as_bytes(arr: np.ndarray) -> np.ndarray:
    """``arr`` as a 2-D uint8 view, one row per sample (no copy)."""
    return arr.reshape(arr.shape[0], -1).view(np.uint8) if arr.size else np.empty((arr.shape[0], 0), np.uint8)


class RowGather:
    """Copies rows of a fixed set of same-typed sources into batch buffers; sources may be mapped lazily.

    ``num_rows[j]`` is source ``j``'s row count. ``gather`` asks ``open_source(j)`` for a source
    the first time a row of it is needed and keeps the returned array alive while this object
    lives. Thread-safe: several threads may gather into different outputs at once.
    """

    def __init__(self, num_rows: np.ndarray, dtype: np.dtype, row_shape: tuple[int, ...], open_source) -> None:
        self.num_rows = _int64_vector("num_rows", np.asarray(num_rows, dtype=np.int64))
        self.dtype = np.dtype(dtype)
        self.row_shape = tuple(row_shape)
        self.row_bytes = int(self.dtype.itemsize * np.prod(self.row_shape, dtype=np.int64))
        self._open = open_source
        self._arrays: list[np.ndarray | None] = [None] * self.num_rows.size
        self._bases = np.zeros(self.num_rows.size, dtype=np.uint64)
        self._lock = threading.Lock()

    def source(self, j: int) -> np.ndarray | None:
        """Source ``j`` if it has been opened."""
        return self._arrays[j]

    def open(self, j: int) -> np.ndarray:
        """Source ``j``, opened now if it was not yet."""
        with self._lock:
            if self._arrays[j] is not None:
                return self._arrays[j]
            arr = self._open(j)
            if arr.dtype != self.dtype or arr.shape[1:] != self.row_shape or arr.shape[0] != self.num_rows[j]:
                raise ValueError(f"source {j} is {arr.shape} {arr.dtype}, expected "
                                 f"({int(self.num_rows[j])}, *{self.row_shape}) {self.dtype}")
            if not arr.flags.c_contiguous:
                raise TypeError(f"source {j} must be C-contiguous")
            self._arrays[j] = arr
            self._bases[j] = arr.ctypes.data if arr.size else 0
            return arr

    def gather(self, source_index: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
        """``out[i] = source(source_index[i])[rows[i]]`` for every ``i`` (GIL released while copying)."""
        if out.shape[0] != source_index.shape[0] or out.shape[1:] != self.row_shape or out.dtype != self.dtype:
            raise ValueError(f"out is {out.shape} {out.dtype}, expected ({source_index.shape[0]}, *{self.row_shape}) {self.dtype}")
        if self.row_bytes == 0 or out.shape[0] == 0:
            return
        out_bytes = _as_bytes(out)
        while True:
            status = _kernels.gather_rows(self._bases, self.num_rows, source_index, rows, self.row_bytes, out_bytes)
            if status == -1:
                return
            if status >= 0:
                self.open(int(status))
                continue
            i = -2 - status
            raise IndexError(f"row {int(rows[i])} of source {int(source_index[i])} is out of range "
                             f"(position {i} of the batch)")


def gather_rows(sources: list[np.ndarray], source_index: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
    """Copy ``sources[source_index[i]][rows[i]]`` into ``out[i]`` for every ``i``, the GIL released.

    All sources and ``out`` share a dtype and per-row shape and are C-contiguous; runs of
    consecutive rows of one source are copied with one ``memcpy``.
    """
    source_index = _int64_vector("source_index", source_index)
    rows = _int64_vector("rows", rows)
    if source_index.size != rows.size:
        raise ValueError(f"source_index and rows differ in length ({source_index.size} vs {rows.size})")
    if not isinstance(out, np.ndarray) or not out.flags.c_contiguous or not out.flags.writeable:
        raise TypeError("out must be a writeable, C-contiguous numpy.ndarray")
    for k, src in enumerate(sources):
        if not isinstance(src, np.ndarray):
            raise TypeError(f"sources[{k}] must be a numpy.ndarray, got {type(src).__name__}")
        _row_bytes(f"sources[{k}]", src)
        if src.dtype != out.dtype or src.shape[1:] != out.shape[1:]:
            raise TypeError(f"sources[{k}] is {src.dtype} rows of {src.shape[1:]}, out is {out.dtype} rows of {out.shape[1:]}")
    gather = RowGather(np.array([s.shape[0] for s in sources], dtype=np.int64), out.dtype, out.shape[1:],
                       lambda j: sources[j])
    gather.gather(source_index, rows, out)


def resident_fraction(path: str | os.PathLike[str]) -> float:
    """Fraction of ``path``'s pages that are in the page cache (``mincore``); 1.0 for an empty file."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return 1.0
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            view = memoryview(mm)
            try:
                resident = _kernels.resident_pages(view, mmap.PAGESIZE)
            finally:
                view.release()
    return resident / ((size + mmap.PAGESIZE - 1) // mmap.PAGESIZE)
