"""Reading ``.npy`` headers with NumPy's own ``numpy.lib.format`` readers (no data is read)."""

from __future__ import annotations

import io
import os
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from numpy.lib import format as npformat

MAGIC = b"\x93NUMPY"
MAX_HEADER_BYTES = 10_000  # NumPy's own default limit for untrusted headers


@dataclass(frozen=True)
class NpyHeader:
    """What a ``.npy`` header promises: the array's shape and dtype, and where its data starts."""

    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    data_offset: int

    @property
    def data_bytes(self) -> int:
        """Bytes of array data that must follow the header."""
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def file_bytes(self) -> int:
        """Exact size of a file holding this array (what ``np.save`` writes)."""
        return self.data_offset + self.data_bytes


@lru_cache(maxsize=1024)
def _parse(version: tuple[int, int], length_and_header: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
    # Shards of one cache share a handful of distinct headers, so NumPy parses each only once.
    f = io.BytesIO(length_and_header)
    reader = npformat.read_array_header_1_0 if version == (1, 0) else npformat.read_array_header_2_0
    shape, fortran_order, dtype = reader(f)
    return tuple(int(d) for d in shape), bool(fortran_order), np.dtype(dtype)


def read_header_bytes(head: bytes) -> NpyHeader:
    """Parse a header from the first bytes of a file (at least the whole header; extra bytes are ignored)."""
    if len(head) < 8 or head[:6] != MAGIC:
        raise ValueError(f"not a .npy file (starts with {head[:8]!r})")
    version = (head[6], head[7])
    if version not in ((1, 0), (2, 0)):
        raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]}")
    length_size = 2 if version == (1, 0) else 4
    data_offset = 8 + length_size
    if len(head) < data_offset:
        raise ValueError("the header ends before its length field")
    header_len = int.from_bytes(head[8:data_offset], "little")
    if header_len > MAX_HEADER_BYTES:
        raise ValueError(f"header of {header_len:,} bytes exceeds the {MAX_HEADER_BYTES:,}-byte limit")
    data_offset += header_len
    if len(head) < data_offset:
        raise ValueError(f"header promises {header_len} bytes but the file ends after {len(head) - 8 - length_size}")
    shape, fortran_order, dtype = _parse(version, head[8:data_offset])
    return NpyHeader(shape, dtype, fortran_order, data_offset)


def read_header_at(path: str) -> NpyHeader:
    """Parse the header of the ``.npy`` file at ``path``."""
    return read_header_bytes(read_head(path)[0])


HEAD_BYTES = 4096  # one page: holds any header np.save writes for the dtypes a cache may use


def read_head(path: str) -> tuple[bytes, os.stat_result]:
    """The first bytes of ``path`` and the stat of that very file, in one open/fstat/pread (the scan's hot path)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        size = st.st_size
        head = os.pread(fd, HEAD_BYTES, 0)
        if len(head) == HEAD_BYTES and len(head) < size:
            # A header longer than a page: give the parser everything it may ask for.
            head += os.pread(fd, MAX_HEADER_BYTES + 16 - HEAD_BYTES, HEAD_BYTES)
        return head, st
    finally:
        os.close(fd)
