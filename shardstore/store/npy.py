"""Reading ``.npy`` headers with NumPy's own ``numpy.lib.format`` readers (no data is read)."""

from __future__ import annotations

import io
import os
import math
from dataclasses import dataclass
from functools import lru_cache
from collections.abc import Callable
from typing import BinaryIO

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


def read_header(f: BinaryIO) -> NpyHeader:
    """Parse the header at the start of an open ``.npy`` file; ``ValueError`` if it is not one."""
    return _read_header(f.read)


def read_header_bytes(head: bytes) -> NpyHeader:
    """Parse a header from the first bytes of a file (at least the whole header; extra bytes are ignored)."""
    return _read_header(io.BytesIO(head).read)


def _read_header(read: Callable[[int], bytes]) -> NpyHeader:
    start = read(8)
    if len(start) < 8 or start[:6] != MAGIC:
        raise ValueError(f"not a .npy file (starts with {start[:8]!r})")
    version = (start[6], start[7])
    if version not in ((1, 0), (2, 0)):
        raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]}")
    length_size = 2 if version == (1, 0) else 4
    length_bytes = read(length_size)
    if len(length_bytes) < length_size:
        raise ValueError("the header ends before its length field")
    header_len = int.from_bytes(length_bytes, "little")
    if header_len > MAX_HEADER_BYTES:
        raise ValueError(f"header of {header_len:,} bytes exceeds the {MAX_HEADER_BYTES:,}-byte limit")
    header = read(header_len)
    if len(header) < header_len:
        raise ValueError(f"header promises {header_len} bytes but the file ends after {len(header)}")
    shape, fortran_order, dtype = _parse(version, length_bytes + header)
    return NpyHeader(shape, dtype, fortran_order, 8 + length_size + header_len)


def read_header_at(path: str) -> NpyHeader:
    """Parse the header of the ``.npy`` file at ``path``."""
    with open(path, "rb") as f:
        return read_header(f)


HEAD_BYTES = 4096  # one page: holds any header np.save writes for the dtypes a cache may use


def read_head(path: str) -> tuple[bytes, int]:
    """The first bytes of ``path`` and its size, in one open/fstat/pread (the header scan's hot path)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, HEAD_BYTES, 0)
        if len(head) == HEAD_BYTES and len(head) < size:
            # A header longer than a page: give the parser everything it may ask for.
            head += os.pread(fd, MAX_HEADER_BYTES + 16 - HEAD_BYTES, HEAD_BYTES)
        return head, size
    finally:
        os.close(fd)
