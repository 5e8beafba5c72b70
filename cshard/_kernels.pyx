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
