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
