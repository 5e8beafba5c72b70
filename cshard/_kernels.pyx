# cython: language_level=3, boundscheck=False, wraparound=False
"""Hot loops of shardstore, deterministic and GIL-free.

Randomness never enters here: callers draw it in Python and these kernels only
expand and copy, so ``shardstore.reference`` can match them bit for bit.
"""

import numpy as np
cimport numpy as cnp
from libc.stdint cimport int64_t

cnp.import_array()


def locate_rows(const int64_t[::1] sample_ids, const int64_t[::1] offsets,
                int64_t[::1] shard_index, int64_t[::1] row):
    """Map global sample ids to (shard position, row) with ``offsets`` = cumulative starts.

    ``offsets`` has one entry per shard plus the total; it is non-decreasing.
    Returns the number of ids that were out of range (their outputs are -1).
    """
    cdef Py_ssize_t n = sample_ids.shape[0]
    cdef Py_ssize_t num_shards = offsets.shape[0] - 1
    cdef int64_t total = offsets[num_shards] if num_shards >= 0 else 0
    cdef Py_ssize_t i, lo, hi, mid
    cdef int64_t s
    cdef Py_ssize_t bad = 0
    with nogil:
        for i in range(n):
            s = sample_ids[i]
            if s < 0 or s >= total:
                shard_index[i] = -1
                row[i] = -1
                bad += 1
                continue
            # Largest position p with offsets[p] <= s; empty shards (equal offsets)
            # resolve to the last of them, which is the one that holds s.
            lo = 0
            hi = num_shards - 1
            while lo < hi:
                mid = (lo + hi + 1) >> 1
                if offsets[mid] <= s:
                    lo = mid
                else:
                    hi = mid - 1
            shard_index[i] = lo
            row[i] = s - offsets[lo]
    return bad


def expand_epoch(const int64_t[::1] starts, const int64_t[::1] counts,
                 const int64_t[::1] source, int64_t[::1] out):
    """Expand an epoch's visited shards into global sample ids, each shard read front to back.

    ``starts[j]``/``counts[j]``: global id of the first sample and sample count of the
    ``j``-th visited shard. With an empty ``source`` the shards are concatenated in visit
    order (sequential). Otherwise ``source[i]`` names the visited shard that supplies
    output position ``i``: its next unread row (a merge of several shards read in parallel).
    """
    cdef Py_ssize_t num = starts.shape[0]
    cdef Py_ssize_t n = out.shape[0]
    cdef Py_ssize_t i, j, pos = 0
    cdef int64_t r
    cdef int64_t[::1] cursor
    if source.shape[0] == 0:
        with nogil:
            for j in range(num):
                for r in range(counts[j]):
                    out[pos] = starts[j] + r
                    pos += 1
        return
    cursor = np.zeros(num, dtype=np.int64)
    with nogil:
        for i in range(n):
            j = source[i]
            out[i] = starts[j] + cursor[j]
            cursor[j] += 1


def split_rank(const int64_t[::1] order, Py_ssize_t rank, Py_ssize_t world_size,
               Py_ssize_t batch_size, Py_ssize_t start_batch, int64_t[::1] out):
    """This rank's part of global batches ``start_batch ..``: a contiguous run of each.

    Global batch ``b`` is ``order[b*G : (b+1)*G]`` with ``G = world_size * batch_size``;
    the rank reads ``batch_size`` samples at offset ``rank * batch_size`` of it.
    ``out`` has room for ``num_batches * batch_size`` ids.
    """
    cdef Py_ssize_t G = world_size * batch_size
    cdef Py_ssize_t num_batches = out.shape[0] // batch_size
    cdef Py_ssize_t b, t, src
    with nogil:
        for b in range(num_batches):
            src = (start_batch + b) * G + rank * batch_size
            for t in range(batch_size):
                out[b * batch_size + t] = order[src + t]


cdef extern from "string.h" nogil:
    void *memcpy(void *dest, const void *src, size_t n)

cdef extern from "stream_copy.h" nogil:
    void shardstore_stream_copy(void *dst, const void *src, size_t n)
    void shardstore_stream_fence()

from libc.stdint cimport uint64_t, uintptr_t


def gather_batches(const uint64_t[:, ::1] bases, const int64_t[::1] num_rows,
                   const int64_t[::1] row_bytes, const int64_t[::1] source,
                   const int64_t[::1] rows, Py_ssize_t batch_size,
                   const uint64_t[:, ::1] out):
    """Copy the samples of consecutive batches, every field, into their batch buffers.

    Sample ``i`` is row ``rows[i]`` of source ``source[i]``; it goes to row ``i % batch_size``
    of batch ``i // batch_size``. For field ``f``: ``bases[f, j]`` is the address of source
    ``j``'s first row (0: not mapped yet), ``row_bytes[f]`` the bytes of one row, and
    ``out[b, f]`` the address of batch ``b``'s buffer. ``num_rows[j]`` is source ``j``'s row
    count. A run of consecutive rows of one source inside one batch is one ``memcpy``.

    Returns -1 when everything was copied; ``f * num_sources + j`` (>= 0) when source ``j``
    of field ``f`` is not mapped (the caller maps it and calls again); ``-2 - i`` when sample
    ``i`` names a source or row out of range. Copies made before stopping stay made.
    """
    cdef Py_ssize_t n = source.shape[0]
    cdef Py_ssize_t num_fields = bases.shape[0]
    cdef Py_ssize_t num_sources = bases.shape[1]
    cdef Py_ssize_t i, end, f, batch_end
    cdef int64_t j, r, rb
    cdef Py_ssize_t status = -1
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    if out.shape[0] * batch_size < n or out.shape[1] != num_fields or row_bytes.shape[0] != num_fields:
        raise ValueError("out, row_bytes and bases disagree on the number of batches or fields")
    if rows.shape[0] != n or num_rows.shape[0] != num_sources:
        raise ValueError("rows/source or num_rows/bases lengths differ")
    with nogil:
        i = 0
        while i < n:
            j = source[i]
            r = rows[i]
            if j < 0 or j >= num_sources or r < 0 or r >= num_rows[j]:
                status = -2 - i
                break
            # The run: consecutive rows of source j, not past the batch or the source.
            batch_end = (i // batch_size + 1) * batch_size
            if batch_end > n:
                batch_end = n
            end = i + 1
            while end < batch_end and source[end] == j and rows[end] == r + (end - i) and rows[end] < num_rows[j]:
                end += 1
            for f in range(num_fields):
                if bases[f, j] == 0:
                    status = f * num_sources + j
                    break
            if status != -1:
                break
            for f in range(num_fields):
                rb = row_bytes[f]
                shardstore_stream_copy(<unsigned char *> <uintptr_t> (out[i // batch_size, f] + <uint64_t> ((i % batch_size) * rb)),
                       <const unsigned char *> <uintptr_t> (bases[f, j] + <uint64_t> (r * rb)),
                       (end - i) * rb)
            i = end
        shardstore_stream_fence()  # the streamed stores are visible to other threads from here on
    return status


from posix.mman cimport mincore


def resident_pages(const unsigned char[::1] mapped, Py_ssize_t page_size):
    """How many pages of a page-aligned memory map are resident in the page cache (``mincore``)."""
    cdef Py_ssize_t n = mapped.shape[0]
    cdef Py_ssize_t num_pages = (n + page_size - 1) // page_size
    cdef Py_ssize_t k, count = 0
    cdef unsigned char[::1] vec
    if n == 0:
        return 0
    vec = np.zeros(num_pages, dtype=np.uint8)
    if mincore(<void *> &mapped[0], n, &vec[0]) != 0:
        raise OSError("mincore failed")
    for k in range(num_pages):
        count += vec[k] & 1
    return count


from posix.mman cimport madvise
from libc.errno cimport errno


def advise_range(uint64_t address, Py_ssize_t length, int advice, Py_ssize_t page_size):
    """``madvise`` the pages holding ``[address, address + length)``, the GIL released (it may read a file in).

    Returns 0, or the ``errno`` of a failed call.
    """
    cdef uintptr_t start = <uintptr_t> address - (<uintptr_t> address % <uintptr_t> page_size)
    cdef size_t n = <size_t> length + <size_t> (<uintptr_t> address - start)
    cdef int rc
    if length <= 0:
        return 0
    with nogil:
        rc = madvise(<void *> start, n, advice)
        if rc != 0:
            rc = errno
    return rc
