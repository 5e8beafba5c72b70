"""The only importer of the compiled ``cshard`` module: argument checks in Python, loops in Cython."""

from __future__ import annotations

import mmap
import os
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np


class _Extension:
    """Stands in for ``cshard._kernels`` until a kernel is first used, then puts the module in its place.

    ``import shardstore`` (and every module that only names a kernel) stays free of the compiled
    extension; the first attribute read imports it and rebinds this module's ``_kernels``, so later
    calls reach the extension directly. A missing extension is an ``ImportError`` saying how to build
    it, at that first use and every one after: never a silent fallback to slower Python.
    """

    def __getattr__(self, name: str) -> Any:
        global _kernels
        try:
            from cshard import _kernels as module
        except ImportError as exc:
            raise ImportError(
                "shardstore's compiled extension is not built; run `pip install -e .` "
                f"(with a C compiler, Cython and NumPy available) and check its output ({exc})"
            ) from exc
        _kernels = module
        return getattr(module, name)


if TYPE_CHECKING:
    from cshard import _kernels
else:
    _kernels = _Extension()


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


def rank_rows(counts: np.ndarray, source: np.ndarray | None, rank: int, world_size: int, batch_size: int,
              start_batch: int, num_samples: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """This rank's first ``num_samples`` samples of an epoch as (visited shard, row), without global ids.

    The epoch visits shard ``j`` (``counts[j]`` samples, read front to back) as ``source``
    orders its read positions (see ``expand_epoch``; None: one shard after the other).
    Global batch ``b`` is read positions ``[b*G, (b+1)*G)`` with ``G = world_size *
    batch_size``, and rank ``rank`` reads ``[r*batch_size, (r+1)*batch_size)`` of each, from
    global batch ``start_batch`` on (as ``split_rank``).

    Returns ``(touched, source_index, rows, first_sample, last_sample)``: ``touched`` the
    visited shards (indices into ``counts``) in the order this rank first reads them; for
    each sample ``k``, shard ``touched[source_index[k]]`` and its row ``rows[k]``; for each
    touched shard, the first and last sample that read it (``first_sample`` is increasing).
    """
    counts = _int64_vector("counts", counts)
    src = np.empty(0, dtype=np.int64) if source is None else _int64_vector("source", source)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, {world_size})")
    if batch_size < 1 or start_batch < 0 or num_samples < 0:
        raise ValueError("batch_size must be >= 1, start_batch and num_samples >= 0")
    num = counts.size
    touched = np.empty(num, dtype=np.int64)
    first_sample = np.empty(num, dtype=np.int64)
    last_sample = np.empty(num, dtype=np.int64)
    source_index = np.empty(num_samples, dtype=np.int64)
    rows = np.empty(num_samples, dtype=np.int64)
    if source is not None and src.size == 0 and counts.size and counts.sum() > 0:
        raise ValueError(f"source has 0 entries, the shards {int(counts.sum())} samples")
    m = _kernels.rank_rows(counts, src, rank, world_size, batch_size, start_batch, touched, source_index, rows,
                           first_sample, last_sample)
    if m == -1:
        raise ValueError("source must name each visited shard exactly as often as its sample count")
    if m == -2:
        raise ValueError(f"{num_samples} samples of rank {rank} from global batch {start_batch} of "
                         f"{world_size * batch_size} reach past the epoch's {int(counts.sum())} samples")
    return touched[:m].copy(), source_index, rows, first_sample[:m].copy(), last_sample[:m].copy()


_EMPTY = np.zeros(1, np.uint8)  # stands in for the address of a source or buffer with no bytes

FieldSpecs = dict[str, tuple[np.dtype, tuple[int, ...]]]


class SourceFault(OSError):
    """Reading a source's memory map faulted (SIGBUS): its file shrank while it was mapped.

    ``field`` and ``source`` say which map; the caller, who knows the file, names it to the user.
    """

    def __init__(self, field: str, source: int, address: int) -> None:
        super().__init__(f"field {field!r} of source {source}: its memory map faulted at 0x{address:x} "
                         "(the file shrank while mapped)")
        self.field = field
        self.source = source
        self.address = address


class SourceShrank(OSError):
    """Reading a source's file with ``pread`` ended early: the file shrank after it was opened.

    ``field`` and ``source`` say which file, ``offset`` where it ended; the caller names it to the user.
    """

    def __init__(self, field: str, source: int, offset: int) -> None:
        super().__init__(f"field {field!r} of source {source}: its file ended at byte {offset:,}, before the rows "
                         "it was read for (the file shrank while open)")
        self.field = field
        self.source = source
        self.offset = offset


class FileRows:
    """The rows of a field in an open file, for ``BatchGather`` to read with ``pread``: no map, no page faults.

    ``fd`` is owned by the gather that opens this source (closed on ``release``); row 0 starts at
    byte ``offset`` and the rows take ``nbytes``; ``file_bytes`` is the file's size when opened.
    """

    __slots__ = ("fd", "offset", "nbytes", "file_bytes", "path")

    def __init__(self, fd: int, offset: int, nbytes: int, file_bytes: int, path: str) -> None:
        self.fd, self.offset, self.nbytes, self.file_bytes, self.path = int(fd), int(offset), int(nbytes), \
            int(file_bytes), str(path)

    def __repr__(self) -> str:
        return f"FileRows({self.path!r}, fd={self.fd}, offset={self.offset}, nbytes={self.nbytes})"


def _close_files(fds: np.ndarray) -> None:
    """Close the descriptors a collected gather still held (a job dropped without ``release``)."""
    for fd in fds[fds >= 0].tolist():
        try:
            os.close(fd)
        except OSError:
            pass
    fds[...] = -1


def _specs(fields: FieldSpecs) -> FieldSpecs:
    return {name: (np.dtype(dtype), tuple(int(d) for d in shape)) for name, (dtype, shape) in fields.items()}


def _row_bytes(dtype: np.dtype, shape: tuple[int, ...]) -> int:
    return dtype.itemsize * int(np.prod(shape, dtype=np.int64))


class BatchBuffers:
    """Destination buffers for ``gather``: ``buffers[k][field]`` holds batch ``k``, checked once.

    Each buffer is a writeable, C-contiguous array of ``batch_size`` rows of its field's
    dtype and shape; the kernel gets their addresses *and sizes* (it refuses a copy past a
    buffer's end), and this object keeps them alive. Fields are matched to a gather's by name.
    """

    def __init__(self, buffers: list[dict[str, np.ndarray]], fields: FieldSpecs, batch_size: int) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.buffers = buffers
        self.batch_size = int(batch_size)
        self.fields = _specs(fields)
        self.names = list(self.fields)
        self.addresses = np.zeros((len(buffers), len(fields)), np.uint64)
        self.sizes = np.zeros((len(buffers), len(fields)), np.uint64)
        for k, batch in enumerate(buffers):
            for f, (name, (dtype, shape)) in enumerate(self.fields.items()):
                arr = batch.get(name)
                if not isinstance(arr, np.ndarray):
                    raise TypeError(f"buffer {k} has no numpy array for field {name!r}")
                if arr.dtype != dtype or arr.shape != (batch_size, *shape):
                    raise TypeError(f"buffer {k} field {name!r} is {arr.shape} {arr.dtype}, "
                                    f"expected {(batch_size, *shape)} {np.dtype(dtype)}")
                if not (arr.flags.c_contiguous and arr.flags.writeable):
                    raise TypeError(f"buffer {k} field {name!r} must be writeable and C-contiguous")
                self.addresses[k, f] = arr.ctypes.data if arr.size else _EMPTY.ctypes.data
                self.sizes[k, f] = arr.nbytes

    def columns(self, fields: FieldSpecs) -> np.ndarray:
        """Column of each of ``fields`` in ``addresses``; ValueError naming ``buffers`` if one is missing or differs."""
        out = np.empty(len(fields), np.int64)
        for f, (name, spec) in enumerate(fields.items()):
            mine = self.fields.get(name)
            if mine is None:
                raise ValueError(f"buffers hold no field {name!r} (they hold {self.names}); "
                                 "build BatchBuffers with the gather's fields")
            if mine != spec:
                raise ValueError(f"buffers hold field {name!r} as {mine[1]} {mine[0]}, the gather copies "
                                 f"{spec[1]} {spec[0]}; build BatchBuffers with the gather's fields")
            out[f] = self.names.index(name)
        return out

    def __len__(self) -> int:
        return len(self.buffers)


class BatchGather:
    """Copies rows of a fixed list of shards, every field, into batch buffers; shards are opened lazily.

    ``num_rows[j]`` is shard ``j``'s row count and ``fields`` maps each field to its dtype
    and per-row shape. The first time a row of shard ``j`` is needed, ``open_source(name, j)``
    returns that field's source, which this object then keeps until ``release(j)``: an array
    (a memory map, copied from), or a ``FileRows`` (an open file, read with ``pread`` straight
    into the buffers; its descriptor is closed on ``release`` or when this object is collected).
    Thread-safe: threads may gather different batches at once. A map whose file shrank under it
    raises ``SourceFault`` for the batch that reads it, a file that shrank ``SourceShrank``.

    With ``open_file``, the fields in ``file_fields`` are opened through it instead (it may return
    either kind) while fewer than ``max_files`` sources are open as files: the descriptors this
    object holds stay bounded however many shards are in flight.
    """

    def __init__(self, num_rows: np.ndarray, fields: FieldSpecs, open_source: Callable[[str, int], np.ndarray], *,
                 open_file: Callable[[str, int], np.ndarray | FileRows] | None = None,
                 file_fields: tuple[str, ...] = (), max_files: int = 0) -> None:
        self.num_rows = _int64_vector("num_rows", np.ascontiguousarray(num_rows, dtype=np.int64))
        if self.num_rows.size and self.num_rows.min() < 0:
            raise ValueError("num_rows must be non-negative")
        self.fields = _specs(fields)
        self.row_bytes = np.array([_row_bytes(dtype, shape) for dtype, shape in self.fields.values()], dtype=np.int64)
        self._names = list(self.fields)
        self._open = open_source
        self._open_file = open_file
        self.file_fields = frozenset(file_fields) if open_file is not None else frozenset()
        self.max_files = int(max_files)
        shape = (len(self._names), self.num_rows.size)
        self._arrays: list[list[np.ndarray | FileRows | None]] = [[None] * self.num_rows.size for _ in self._names]
        self._bases = np.zeros(shape, dtype=np.uint64)
        self._source_bytes = np.zeros(shape, dtype=np.uint64)
        self._fds = np.full(shape, -1, dtype=np.int64)
        self._file_offsets = np.zeros(shape, dtype=np.int64)
        self.files_open = 0
        """Sources open as files now (each holds a descriptor)."""
        self._closer = weakref.finalize(self, _close_files, self._fds)
        self._buffers_seen: tuple[BatchBuffers, np.ndarray, np.ndarray] | None = None
        self._lock = threading.Lock()

    def source(self, name: str, j: int) -> np.ndarray | FileRows | None:
        """Field ``name`` of shard ``j`` if it is open."""
        return self._arrays[self._names.index(name)][j]

    def open(self, name: str, j: int) -> np.ndarray | FileRows:
        """Field ``name`` of shard ``j``, opened now if it was not yet."""
        f = self._names.index(name)
        with self._lock:
            arr = self._arrays[f][j]
            if arr is not None:
                return arr
            if name in self.file_fields and self.files_open < self.max_files:
                arr = self._open_file(name, j)
            else:
                arr = self._open(name, j)
            dtype, shape = self.fields[name]
            if isinstance(arr, FileRows):
                want = int(self.num_rows[j]) * int(self.row_bytes[f])
                if arr.nbytes != want or arr.fd < 0 or arr.offset < 0:
                    if arr.fd >= 0:
                        os.close(arr.fd)
                    raise ValueError(f"source {j} of field {name!r} is a file with {arr.nbytes} bytes of rows at "
                                     f"offset {arr.offset}, expected {want}")
                self._arrays[f][j] = arr
                self._source_bytes[f, j] = arr.nbytes
                self._file_offsets[f, j] = arr.offset
                self._fds[f, j] = arr.fd
                self.files_open += 1
                return arr
            if not isinstance(arr, np.ndarray) or arr.dtype != dtype or arr.shape != (self.num_rows[j], *shape):
                got = f"{arr.shape} {arr.dtype}" if isinstance(arr, np.ndarray) else type(arr).__name__
                raise ValueError(f"source {j} of field {name!r} is {got}, "
                                 f"expected {(int(self.num_rows[j]), *shape)} {dtype}")
            if not arr.flags.c_contiguous:
                raise TypeError(f"source {j} of field {name!r} must be C-contiguous")
            self._arrays[f][j] = arr
            self._source_bytes[f, j] = arr.nbytes
            self._bases[f, j] = arr.ctypes.data if arr.size else _EMPTY.ctypes.data
            return arr

    def release(self, j: int) -> list[np.ndarray]:
        """Forget shard ``j``'s sources: close its files, return its maps (they unmap when the last reference
        goes); reopened if needed again.

        The caller guarantees no gather running now reads shard ``j``.
        """
        out = []
        with self._lock:
            self._bases[:, j] = 0
            self._source_bytes[:, j] = 0
            for f, arrays in enumerate(self._arrays):
                src = arrays[j]
                arrays[j] = None
                if isinstance(src, FileRows):
                    self._fds[f, j] = -1
                    self.files_open -= 1
                    os.close(src.fd)
                elif src is not None:
                    out.append(src)
        return out

    def release_all(self) -> None:
        """Forget every map (no gather may be running)."""
        for j in range(self.num_rows.size):
            self.release(j)

    def _columns_of(self, buffers: BatchBuffers) -> tuple[np.ndarray, np.ndarray]:
        """``buffers``' addresses and sizes with this gather's fields as columns, in its order (checked once)."""
        cached = self._buffers_seen
        if cached is not None and cached[0] is buffers:
            return cached[1], cached[2]
        columns = buffers.columns(self.fields)
        if np.array_equal(columns, np.arange(buffers.addresses.shape[1])):
            addresses, sizes = buffers.addresses, buffers.sizes
        else:
            addresses = np.ascontiguousarray(buffers.addresses[:, columns])
            sizes = np.ascontiguousarray(buffers.sizes[:, columns])
        self._buffers_seen = (buffers, addresses, sizes)
        return addresses, sizes

    def gather(self, source_index: np.ndarray, rows: np.ndarray, buffers: BatchBuffers, first: int = 0) -> None:
        """Sample ``i``: row ``rows[i]`` of shard ``source_index[i]`` -> row ``i % batch_size`` of buffer
        ``first + i // batch_size``, for every field; the GIL is released while copying."""
        if not isinstance(buffers, BatchBuffers):
            raise TypeError(f"buffers must be a BatchBuffers, got {type(buffers).__name__}")
        source_index = _int64_vector("source_index", source_index)
        rows = _int64_vector("rows", rows)
        if source_index.size != rows.size:
            raise ValueError(f"source_index and rows differ in length ({source_index.size} vs {rows.size})")
        n = source_index.shape[0]
        count = -(-n // buffers.batch_size)
        if first < 0 or first + count > len(buffers):
            raise ValueError(f"{count} batches from buffer {first} do not fit the {len(buffers)} buffers")
        addresses, sizes = self._columns_of(buffers)
        out, out_bytes = addresses[first : first + count], sizes[first : first + count]
        info = np.zeros(4, np.int64)
        # A system call (under a microsecond): someone may have replaced the handler since (faulthandler.enable()).
        _kernels.install_bus_handler()
        while True:
            status = _kernels.gather_batches(self._bases, self._source_bytes, self.num_rows, self.row_bytes,
                                             source_index, rows, buffers.batch_size, out, out_bytes, info,
                                             self._fds, self._file_offsets)
            if status == _kernels.DONE:
                return
            i, f, j = int(info[0]), int(info[1]), int(info[2])
            if status == _kernels.UNMAPPED:
                self.open(self._names[f], j)
                continue
            if status == _kernels.FAULT:
                raise SourceFault(self._names[f], j, int(info[3]) & ((1 << 64) - 1))
            if status == _kernels.SHORT_READ:
                raise SourceShrank(self._names[f], j, int(info[3]))
            if status == _kernels.READ_ERROR:
                src = self._arrays[f][j]
                raise OSError(int(info[3]), os.strerror(int(info[3])), getattr(src, "path", f"source {j}"))
            if status == _kernels.BAD_ROW:
                raise IndexError(f"sample {i}: row {int(rows[i])} of source {int(source_index[i])} is out of range")
            if status == _kernels.OUT_SHORT:
                raise ValueError(f"buffers: sample {i} of field {self._names[f]!r} does not fit its batch buffer")
            # SRC_SHORT: the source was released while this gather ran (the caller broke its promise).
            raise ValueError(f"sample {i}: source {j} of field {self._names[f]!r} is shorter than its rows")


def gather_rows(sources: list[np.ndarray], source_index: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
    """Copy ``sources[source_index[i]][rows[i]]`` into ``out[i]`` for every ``i``, the GIL released.

    All sources and ``out`` share a dtype and per-row shape and are C-contiguous; runs of
    consecutive rows of one source are copied with one ``memcpy``.
    """
    source_index = _int64_vector("source_index", source_index)
    rows = _int64_vector("rows", rows)
    if source_index.size != rows.size:
        raise ValueError(f"source_index and rows differ in length ({source_index.size} vs {rows.size})")
    if not isinstance(out, np.ndarray) or out.ndim < 1 or out.shape[0] != rows.size:
        raise TypeError(f"out must be a numpy.ndarray with {rows.size} rows")
    for k, src in enumerate(sources):
        if not isinstance(src, np.ndarray) or src.ndim < 1:
            raise TypeError(f"sources[{k}] must be a numpy.ndarray with a row axis")
        if src.dtype != out.dtype or src.shape[1:] != out.shape[1:]:
            raise TypeError(f"sources[{k}] is {src.dtype} rows of {src.shape[1:]}, "
                            f"out is {out.dtype} rows of {out.shape[1:]}")
    if rows.size == 0:
        return
    spec = {"x": (out.dtype, out.shape[1:])}
    gather = BatchGather(np.array([s.shape[0] for s in sources], dtype=np.int64), spec, lambda _, j: sources[j])
    gather.gather(source_index, rows, BatchBuffers([{"x": out}], spec, rows.size))


def map_file(fd: int, length: int, path: str) -> _kernels.Mapping:
    """Map ``length`` bytes of the open file ``fd`` read-only; the map keeps no descriptor (close ``fd`` at once).

    The result exports a read-only buffer (``np.frombuffer`` views it) and is unmapped when
    the last array viewing it is gone.
    """
    return _kernels.Mapping(int(fd), int(length), str(path))


def file_map_of(arr: np.ndarray) -> _kernels.Mapping | mmap.mmap | None:
    """The memory map an array views (a ``Mapping`` or ``mmap.mmap``), or None if it views none."""
    base: object = arr
    while base is not None and not isinstance(base, (_kernels.Mapping, mmap.mmap)):
        base = base.obj if isinstance(base, memoryview) else getattr(base, "base", None)
    return base


def copy_from_map(arr: np.ndarray, field: str = "", source: int = 0) -> np.ndarray:
    """A private copy of an array that views a ``Mapping``; ``SourceFault(field, source)`` if its file shrank under it.

    A plain NumPy copy of such a map kills the process (SIGBUS) when the file was truncated.
    """
    mapping = file_map_of(arr)
    out = np.empty(arr.shape, arr.dtype)
    if not isinstance(mapping, _kernels.Mapping) or not arr.flags.c_contiguous:
        out[...] = arr
        return out
    src = arr.reshape(-1).view(np.uint8)
    _kernels.install_bus_handler()
    fault = _kernels.guarded_copy(src, out.reshape(-1).view(np.uint8), mapping.address, len(mapping))
    if fault:
        raise SourceFault(field, source, fault)
    return out


class Heads:
    """What ``read_heads`` learned of each file: an ``errno`` (0: fine), its ``lstat``/``fstat`` and first bytes.

    ``size``, ``mtime_ns``, ``ctime_ns``, ``mode`` and ``ino`` (uint64) are 0 where ``errno`` is
    set; ``heads[i, :read[i]]`` are the bytes read (only of regular files; none in stat-only mode).
    """

    __slots__ = ("ctime_ns", "errno", "heads", "ino", "mode", "mtime_ns", "read", "size", "stats")

    def __init__(self, stats: np.ndarray, heads: np.ndarray) -> None:
        self.stats = stats
        self.heads = heads
        self.errno = stats[:, _kernels.HEAD_ERRNO]
        self.size = stats[:, _kernels.HEAD_SIZE]
        self.mtime_ns = stats[:, _kernels.HEAD_MTIME_NS]
        self.mode = stats[:, _kernels.HEAD_MODE]
        self.ino = stats[:, _kernels.HEAD_INO].view(np.uint64)
        self.read = stats[:, _kernels.HEAD_READ]
        self.ctime_ns = stats[:, _kernels.HEAD_CTIME_NS]

    def __len__(self) -> int:
        return len(self.stats)

    def regular(self) -> np.ndarray:
        """Files that were opened, are regular files, and were read without an error."""
        return (self.errno == 0) & (self.mode & 0o170000 == 0o100000)


def read_heads(dir_fd: int, paths: list[bytes], width: int, offset: int = 0) -> Heads:
    """Stat each file of ``paths`` (relative to ``dir_fd``) and read ``width`` bytes of it from ``offset``, GIL-free.

    Each file is opened with ``O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC``: a symlink in
    its last component is not followed (``errno`` ``ELOOP``; the caller resolves it and decides),
    a FIFO never blocks, and only regular files are read. ``width == 0`` opens nothing and
    ``lstat``-s each path (``fstatat(AT_SYMLINK_NOFOLLOW)``). One system call of each kind per
    file, with no Python work between them: a plain Python loop of ``os.stat`` and a read costs
    more than the calls themselves.
    """
    if not isinstance(paths, list):
        raise TypeError(f"paths must be a list of bytes (relative paths, os.fsencode-d), got {type(paths).__name__}")
    if width < 0 or offset < 0:
        raise ValueError(f"width and offset must be >= 0, got {width} and {offset}")
    try:
        joined = b"".join(paths)
    except TypeError:
        raise TypeError("paths must be a list of bytes (relative paths, os.fsencode-d)") from None
    if b"\0" in joined:
        raise ValueError("a path holds a NUL byte; no file has such a name")
    starts = np.zeros(len(paths) + 1, np.int64)
    np.cumsum(np.fromiter(map(len, paths), np.int64, len(paths)), out=starts[1:])
    heads = np.zeros((len(paths), width), np.uint8)
    stats = np.empty((len(paths), 7), np.int64)
    _kernels.read_heads(int(dir_fd), joined, starts, heads, stats, int(offset))
    return Heads(stats, heads)
