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

from libc.stdint cimport uint64_t, uintptr_t


def gather_rows(const uint64_t[::1] bases, const int64_t[::1] num_rows,
                const int64_t[::1] source, const int64_t[::1] rows,
                Py_ssize_t row_bytes, unsigned char[:, ::1] out):
    """Copy row ``rows[i]`` of source ``source[i]`` into ``out[i]``, for every ``i``.

    ``bases[j]`` is the address of source ``j``'s first row (0: not mapped yet) and
    ``num_rows[j]`` its row count; rows are ``row_bytes`` long and C-contiguous.
    Runs of consecutive rows of one source become one ``memcpy``.

    Returns -1 when every row was copied; ``j`` >= 0 when source ``j`` is not mapped
    (the caller maps it and calls again); ``-2 - i`` when row ``i`` is out of range.
    Rows before the stopping point may already have been copied.
    """
    cdef Py_ssize_t n = source.shape[0]
    cdef Py_ssize_t num_sources = bases.shape[0]
    cdef Py_ssize_t i = 0, end
    cdef int64_t j, r
    cdef Py_ssize_t status = -1
    cdef unsigned char *dst
    if n == 0:
        return -1
    dst = &out[0, 0]
    with nogil:
        while i < n:
            j = source[i]
            r = rows[i]
            if j < 0 or j >= num_sources or r < 0 or r >= num_rows[j]:
                status = -2 - i
                break
            if bases[j] == 0:
                status = j
                break
            end = i + 1
            while end < n and source[end] == j and rows[end] == r + (end - i) and rows[end] < num_rows[j]:
                end += 1
            memcpy(dst + i * row_bytes, <const unsigned char *> <uintptr_t> (bases[j] + <uint64_t> (r * row_bytes)),
                   (end - i) * row_bytes)
            i = end
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
