# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=False
"""Hot loops of shardstore, deterministic and GIL-free.

Randomness never enters here: callers draw it in Python and these kernels only
expand and copy, so ``shardstore.reference`` can match them bit for bit. Every copy is
given the sizes of its source and destination, and reads of memory maps are guarded: a file
that shrank under its map is reported, not a SIGBUS that kills the process (see gather.h).
"""

import numpy as np
cimport numpy as cnp
from libc.errno cimport errno
from libc.stdint cimport int64_t, uint64_t, uintptr_t

cnp.import_array()


def locate_rows(const int64_t[::1] sample_ids, const int64_t[::1] offsets,
                int64_t[::1] shard_position, int64_t[::1] row):
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
                shard_position[i] = -1
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
            shard_position[i] = lo
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
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or start_batch < 0:
        raise ValueError(f"split_rank needs batch_size >= 1, world_size >= 1, 0 <= rank < world_size and "
                         f"start_batch >= 0, got {batch_size}, {world_size}, {rank}, {start_batch}")
    cdef Py_ssize_t G = world_size * batch_size
    cdef Py_ssize_t num_batches = out.shape[0] // batch_size
    cdef Py_ssize_t b, t, src
    if (start_batch + num_batches) * G > order.shape[0]:
        raise ValueError(f"{start_batch + num_batches} global batches of {G} exceed the {order.shape[0]} ids")
    with nogil:
        for b in range(num_batches):
            src = (start_batch + b) * G + rank * batch_size
            for t in range(batch_size):
                out[b * batch_size + t] = order[src + t]


cdef inline Py_ssize_t _touch(int64_t j, Py_ssize_t k, int64_t *local, int64_t *touched, int64_t *first_sample,
                              Py_ssize_t *m) noexcept nogil:
    """Index into ``touched`` of visited shard ``j``, which sample ``k`` reads; added on the rank's first read."""
    cdef int64_t l = local[j]
    if l < 0:
        l = m[0]
        local[j] = l
        touched[l] = j
        first_sample[l] = k
        m[0] += 1
    return l


cdef Py_ssize_t _rank_rows(const int64_t *counts, Py_ssize_t num, const int64_t *source, bint mixed, int64_t total,
                           Py_ssize_t rank, Py_ssize_t world_size, Py_ssize_t batch_size, Py_ssize_t start_batch,
                           Py_ssize_t n, int64_t *cursor, int64_t *local, int64_t *touched, int64_t *source_index,
                           int64_t *rows, int64_t *first_sample, int64_t *last_sample) noexcept nogil:
    cdef Py_ssize_t G = world_size * batch_size
    cdef Py_ssize_t k = 0, i, size, m = 0
    cdef int64_t g, stop, p = 0, j = 0, l, r, here = 0  # here (sequential): epoch position of shard j's row 0
    cdef int64_t b = start_batch
    while k < n:  # one global batch at a time: the rank reads positions [g, g + size) of it
        g = b * G + rank * batch_size
        size = min(batch_size, n - k)
        stop = g + size
        if stop > total:
            return -2
        if mixed:
            while p < g:  # positions of other ranks (or earlier batches) still move their shard's cursor
                j = source[p]
                if j < 0 or j >= num or cursor[j] >= counts[j]:
                    return -1
                cursor[j] += 1
                p += 1
            for i in range(size):
                j = source[p]
                if j < 0 or j >= num or cursor[j] >= counts[j]:
                    return -1
                rows[k] = cursor[j]
                cursor[j] += 1
                l = _touch(j, k, local, touched, first_sample, &m)
                source_index[k] = l
                last_sample[l] = k
                k += 1
                p += 1
        else:
            while g < stop:  # runs of consecutive rows of one shard; positions only grow, so shards only advance
                while g >= here + counts[j]:
                    here += counts[j]
                    j += 1
                size = min(stop, here + counts[j]) - g
                l = _touch(j, k, local, touched, first_sample, &m)
                r = g - here
                for i in range(size):
                    rows[k + i] = r + i
                    source_index[k + i] = l
                k += size
                g += size
                last_sample[l] = k - 1
        b += 1
    return m


def rank_rows(const int64_t[::1] counts, const int64_t[::1] source, Py_ssize_t rank, Py_ssize_t world_size,
              Py_ssize_t batch_size, Py_ssize_t start_batch, int64_t[::1] touched, int64_t[::1] source_index,
              int64_t[::1] rows, int64_t[::1] first_sample, int64_t[::1] last_sample):
    """This rank's samples of an epoch as (shard, row) pairs, without global ids; returns the shards touched.

    The epoch visits shard ``j`` (``counts[j]`` samples, read front to back) in the order
    ``source`` gives (empty: one shard after the other). Read position ``g`` of the epoch is
    this rank's sample ``k`` when ``g = (start_batch + k // batch_size) * G + rank * batch_size
    + k % batch_size`` with ``G = world_size * batch_size``, for ``k < source_index.shape[0]``.

    Sample ``k`` is row ``rows[k]`` of visited shard ``touched[source_index[k]]``: ``touched``
    lists the visited shards in the order this rank first reads them, and
    ``first_sample``/``last_sample`` the first and last of its samples that read each (room
    for ``counts.shape[0]`` entries each). Returns the number of shards touched, or -1 if
    ``source`` names a shard outside ``counts`` or more often than its count (outputs then
    partial), or -2 if a position lies past the epoch's end.
    """
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or start_batch < 0:
        raise ValueError(f"rank_rows needs batch_size >= 1, world_size >= 1, 0 <= rank < world_size and "
                         f"start_batch >= 0, got {batch_size}, {world_size}, {rank}, {start_batch}")
    cdef Py_ssize_t num = counts.shape[0]
    cdef Py_ssize_t n = source_index.shape[0]
    cdef Py_ssize_t k
    cdef int64_t total = 0
    cdef Py_ssize_t m
    if rows.shape[0] != n or touched.shape[0] < num or first_sample.shape[0] < num or last_sample.shape[0] < num:
        raise ValueError("rows must be as long as source_index; touched, first_sample and last_sample "
                         "need room for every visited shard")
    for k in range(num):
        if counts[k] < 0:
            raise ValueError("counts must be non-negative")
        total += counts[k]
    if source.shape[0] != 0 and source.shape[0] != total:
        raise ValueError(f"source has {source.shape[0]} entries, the shards {total} samples")
    if n == 0 or num == 0:
        return 0
    cdef int64_t[::1] cursor = np.zeros(num, dtype=np.int64)  # rows of each shard read so far
    cdef int64_t[::1] local = np.full(num, -1, dtype=np.int64)  # index into touched, -1 before first read
    cdef bint mixed = source.shape[0] != 0
    cdef const int64_t *src = &source[0] if mixed else NULL
    with nogil:
        m = _rank_rows(&counts[0], num, src, mixed, total, rank, world_size, batch_size, start_batch, n,
                       &cursor[0], &local[0], &touched[0], &source_index[0], &rows[0], &first_sample[0],
                       &last_sample[0])
    return m


cdef extern from "gather.h" nogil:
    int SHARDSTORE_DONE, SHARDSTORE_FAULT
    int shardstore_gather(const uint64_t *bases, const uint64_t *source_bytes, int64_t num_fields,
                          int64_t num_sources, const int64_t *num_rows, const int64_t *row_bytes,
                          const int64_t *source, const int64_t *rows, int64_t n, int64_t batch_size,
                          const uint64_t *out, const uint64_t *out_bytes, int64_t num_batches, int64_t *info,
                          const int64_t *fds, const int64_t *file_offsets)
    int shardstore_guarded_copy(void *dst, const void *src, size_t n, uintptr_t lo, size_t span,
                                uintptr_t *fault_address)
    int shardstore_install_bus_handler()

#: what ``gather_batches`` returns (its ``info`` says where); kept in step with gather.h
DONE, UNMAPPED, BAD_ROW, OUT_SHORT, SRC_SHORT, FAULT, SHORT_READ, READ_ERROR = range(8)


def install_bus_handler():
    """Install the SIGBUS handler that guarded copies rely on, again if someone replaced it; False if refused.

    Without it, a guarded copy whose file shrank kills the process as an unguarded one would.
    """
    return shardstore_install_bus_handler() == 0


def gather_batches(const uint64_t[:, ::1] bases, const uint64_t[:, ::1] source_bytes,
                   const int64_t[::1] num_rows, const int64_t[::1] row_bytes, const int64_t[::1] source,
                   const int64_t[::1] rows, Py_ssize_t batch_size, const uint64_t[:, ::1] out,
                   const uint64_t[:, ::1] out_bytes, int64_t[::1] info, const int64_t[:, ::1] fds=None,
                   const int64_t[:, ::1] file_offsets=None):
    """Copy the samples of consecutive batches, every field, into their batch buffers; returns a status.

    Sample ``i`` is row ``rows[i]`` of source ``source[i]``; it goes to row ``i % batch_size``
    of batch ``i // batch_size``. For field ``f``: ``bases[f, j]`` is the address of source
    ``j``'s first row (0: not mapped) and ``source_bytes[f, j]`` the bytes of its rows,
    ``row_bytes[f]`` the bytes of one row, ``out[b, f]`` the address of batch ``b``'s buffer and
    ``out_bytes[b, f]`` its size. ``num_rows[j]`` is source ``j``'s row count. A source that is
    not mapped may be an open file instead: ``fds[f, j]`` (>= 0; -1: none) whose row 0 starts
    at byte ``file_offsets[f, j]``, read with ``pread`` straight into the buffer. A run of
    consecutive rows of one source inside one batch is one copy (or one read).

    No copy reaches past its source or destination: ``SRC_SHORT``/``OUT_SHORT`` instead. A
    source whose file shrank under its map (SIGBUS) gives ``FAULT``, a file that ends before
    the rows ``SHORT_READ``, a failed read ``READ_ERROR``. ``info`` (4 entries) gets the sample,
    field, source and: for ``FAULT`` the address, for ``SHORT_READ`` the file offset where the
    file ended, for ``READ_ERROR`` the errno. Copies made before stopping stay made.
    """
    cdef Py_ssize_t n = source.shape[0]
    cdef Py_ssize_t num_fields = bases.shape[0]
    cdef Py_ssize_t num_sources = bases.shape[1]
    cdef int status
    cdef const int64_t *fd_ptr = NULL
    cdef const int64_t *offset_ptr = NULL
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if (source_bytes.shape[0] != num_fields or source_bytes.shape[1] != num_sources
            or row_bytes.shape[0] != num_fields or num_rows.shape[0] != num_sources):
        raise ValueError("bases, source_bytes, row_bytes and num_rows disagree on the fields or sources")
    if (fds is None) != (file_offsets is None):
        raise ValueError("give fds and file_offsets together, or neither")
    if fds is not None:
        if (fds.shape[0] != num_fields or fds.shape[1] != num_sources or file_offsets.shape[0] != num_fields
                or file_offsets.shape[1] != num_sources):
            raise ValueError("fds and file_offsets must both be (fields, sources) like bases")
        if num_fields and num_sources:
            fd_ptr = &fds[0, 0]
            offset_ptr = &file_offsets[0, 0]
    if out.shape[1] != num_fields or out_bytes.shape[0] != out.shape[0] or out_bytes.shape[1] != num_fields:
        raise ValueError("out and out_bytes must both be (batches, fields) like bases' fields")
    if rows.shape[0] != n or info.shape[0] < 4:
        raise ValueError("rows must be as long as source, info hold 4 entries")
    if n == 0:
        return DONE
    if num_sources == 0 or num_fields == 0:
        info[0] = 0
        return BAD_ROW if num_sources == 0 else DONE
    with nogil:
        status = shardstore_gather(&bases[0, 0], &source_bytes[0, 0], num_fields, num_sources, &num_rows[0],
                                   &row_bytes[0], &source[0], &rows[0], n, batch_size, &out[0, 0],
                                   &out_bytes[0, 0], out.shape[0], &info[0], fd_ptr, offset_ptr)
    return status


def guarded_copy(const unsigned char[::1] source, unsigned char[::1] out, uint64_t map_start, Py_ssize_t map_bytes):
    """Copy ``source`` (bytes of a memory map spanning ``map_bytes`` from ``map_start``) into ``out``.

    Returns 0, or the address that faulted when the file shrank under the map (SIGBUS caught).
    """
    cdef uintptr_t fault = 0
    cdef int status
    if source.shape[0] != out.shape[0]:
        raise ValueError(f"source has {source.shape[0]} bytes, out {out.shape[0]}")
    if source.shape[0] == 0:
        return 0
    with nogil:
        status = shardstore_guarded_copy(&out[0], &source[0], source.shape[0], map_start, map_bytes, &fault)
    return <uint64_t> fault if status == SHARDSTORE_FAULT else 0


from posix.mman cimport mmap as c_mmap, munmap, PROT_READ, MAP_SHARED, MAP_FAILED
from libc.string cimport strerror
from cpython.buffer cimport PyBUF_WRITABLE, PyBUF_FORMAT, PyBUF_ND, PyBUF_STRIDES


cdef char *_BYTE_FORMAT = b"B"


cdef class Mapping:
    """A whole file mapped read-only and shared, holding no file descriptor; unmapped when the last user lets go.

    (``mmap.mmap`` keeps a duplicate of the descriptor for as long as the map lives, so a
    loader mapping thousands of shard files would run out of descriptors.) Arrays view it
    through the buffer protocol, and keep it alive through their ``base``.
    """

    cdef void *_address
    cdef Py_ssize_t _length
    cdef Py_ssize_t _shape[1]
    cdef Py_ssize_t _strides[1]
    cdef readonly str path
    """The file, for error messages."""

    def __cinit__(self, int fd, Py_ssize_t length, str path):
        shardstore_install_bus_handler()  # reads of this map are guarded from here on
        self._address = NULL
        self.path = path
        if length < 1:
            raise ValueError(f"{path}: a map needs at least one byte, got {length}")
        address = c_mmap(NULL, <size_t> length, PROT_READ, MAP_SHARED, fd, 0)
        if address == MAP_FAILED:
            code = errno
            raise OSError(code, strerror(code).decode(errors="replace"), path)
        self._address = address
        self._length = length
        self._shape[0] = length
        self._strides[0] = 1

    def __dealloc__(self):
        if self._address != NULL:
            munmap(self._address, <size_t> self._length)
            self._address = NULL

    @property
    def address(self) -> int:
        """Where the map starts."""
        return <uintptr_t> self._address

    def __len__(self) -> int:
        return self._length

    def __getbuffer__(self, Py_buffer *buffer, int flags):
        if flags & PyBUF_WRITABLE:
            raise BufferError(f"{self.path}: shard maps are read-only")
        buffer.buf = self._address
        buffer.obj = self
        buffer.len = self._length
        buffer.readonly = 1
        buffer.itemsize = 1
        buffer.format = _BYTE_FORMAT if flags & PyBUF_FORMAT else NULL
        buffer.ndim = 1
        buffer.shape = self._shape if flags & PyBUF_ND else NULL
        buffer.strides = self._strides if (flags & PyBUF_STRIDES) == PyBUF_STRIDES else NULL
        buffer.suboffsets = NULL
        buffer.internal = NULL

    def __releasebuffer__(self, Py_buffer *buffer):
        pass


from posix.mman cimport mincore


def resident_pages(const unsigned char[::1] mapped, Py_ssize_t page_size):
    """How many pages of a page-aligned memory map are resident in the page cache (``mincore``)."""
    if page_size < 1:
        raise ValueError(f"page_size must be >= 1, got {page_size}")
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


def advise_range(uint64_t address, Py_ssize_t length, int advice, Py_ssize_t page_size):
    """``madvise`` the pages holding ``[address, address + length)``, the GIL released (it may read a file in).

    Returns 0, or the ``errno`` of a failed call.
    """
    if page_size < 1:
        raise ValueError(f"page_size must be >= 1, got {page_size}")
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


from libc.errno cimport EINTR, ENAMETOOLONG
from libc.string cimport memcpy
from posix.stat cimport struct_stat, fstat, S_ISREG
from posix.unistd cimport close, pread

cdef extern from "<fcntl.h>" nogil:
    int O_RDONLY, O_NOFOLLOW, O_NONBLOCK, O_CLOEXEC, AT_SYMLINK_NOFOLLOW
    int openat(int dirfd, const char *pathname, int flags)

cdef extern from "<sys/stat.h>" nogil:
    int fstatat(int dirfd, const char *pathname, struct_stat *buf, int flags)

#: columns of ``read_heads``' ``stats``
HEAD_ERRNO, HEAD_SIZE, HEAD_MTIME_NS, HEAD_MODE, HEAD_INO, HEAD_READ, HEAD_CTIME_NS = range(7)

cdef enum:
    _PATH_BYTES = 4096  # PATH_MAX: one more byte than the longest path the kernel accepts


def read_heads(int dir_fd, const unsigned char[::1] paths, const int64_t[::1] starts,
               unsigned char[:, ::1] heads, int64_t[:, ::1] stats, int64_t offset=0):
    """Stat and read the first bytes of many files relative to ``dir_fd``, the GIL released.

    File ``i`` is ``paths[starts[i]:starts[i + 1]]`` (no NUL bytes). Each is opened with
    ``O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC`` (a link in its last component fails with
    ``ELOOP``, a FIFO never blocks), ``fstat``-ed, and, if it is a regular file, up to
    ``heads.shape[1]`` bytes from ``offset`` are read into ``heads[i]``; then it is closed.
    With ``heads.shape[1] == 0`` nothing is opened: the path is ``lstat``-ed
    (``fstatat(AT_SYMLINK_NOFOLLOW)``). ``stats[i]`` gets errno (0: fine), st_size,
    st_mtime_ns, st_mode, st_ino (its bits, as int64), the bytes read and st_ctime_ns (see
    ``HEAD_*``); after an error the rest of the row is 0. Bytes of ``heads[i]`` beyond those
    read are left as they were.
    """
    cdef Py_ssize_t n = starts.shape[0] - 1
    cdef Py_ssize_t width = heads.shape[1]
    cdef Py_ssize_t i, length, got
    cdef int64_t start, end
    cdef int fd, flags = O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC
    cdef struct_stat st
    cdef char path[_PATH_BYTES]
    cdef ssize_t r
    cdef int err
    if n < 0:
        raise ValueError("starts must hold at least one entry (the end of the last path)")
    if heads.shape[0] < n or stats.shape[0] < n or stats.shape[1] < 7:
        raise ValueError(f"heads and stats need {n} rows (stats 7 columns), got {heads.shape[0]} and "
                         f"{stats.shape[0]}x{stats.shape[1]}")
    if n and (starts[0] < 0 or starts[n] > paths.shape[0]):
        raise ValueError("starts point outside paths")
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    with nogil:
        for i in range(n):
            start = starts[i]
            end = starts[i + 1]
            stats[i, 0] = 0
            stats[i, 1] = 0
            stats[i, 2] = 0
            stats[i, 3] = 0
            stats[i, 4] = 0
            stats[i, 5] = 0
            stats[i, 6] = 0
            length = end - start
            if length < 0 or length >= _PATH_BYTES:
                stats[i, 0] = ENAMETOOLONG
                continue
            if length:
                memcpy(path, &paths[start], length)
            path[length] = 0
            if width == 0:
                if fstatat(dir_fd, path, &st, AT_SYMLINK_NOFOLLOW) != 0:
                    stats[i, 0] = errno
                    continue
            else:
                fd = openat(dir_fd, path, flags)
                if fd < 0:
                    stats[i, 0] = errno
                    continue
                if fstat(fd, &st) != 0:
                    stats[i, 0] = errno
                    close(fd)
                    continue
                got = 0
                err = 0
                if S_ISREG(st.st_mode):
                    while got < width:
                        r = pread(fd, &heads[i, got], width - got, offset + got)
                        if r < 0:
                            if errno == EINTR:
                                continue
                            err = errno
                            break
                        if r == 0:
                            break
                        got += r
                close(fd)
                if err:
                    stats[i, 0] = err
                    continue
                stats[i, 5] = got
            stats[i, 1] = st.st_size
            stats[i, 2] = <int64_t> st.st_mtim.tv_sec * 1000000000 + st.st_mtim.tv_nsec
            stats[i, 3] = st.st_mode
            stats[i, 4] = <int64_t> st.st_ino
            stats[i, 6] = <int64_t> st.st_ctim.tv_sec * 1000000000 + st.st_ctim.tv_nsec
    return n
