"""Reading ``.npy`` headers with NumPy's own ``numpy.lib.format`` readers (no data is read)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
from numpy.lib import format as npformat


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
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    @property
    def file_bytes(self) -> int:
        """Exact size of a file holding this array (what ``np.save`` writes)."""
        return self.data_offset + self.data_bytes


def read_header(f: BinaryIO) -> NpyHeader:
    """Parse the header at the start of an open ``.npy`` file; ``ValueError`` if it is not one."""
    version = npformat.read_magic(f)
    if version == (1, 0):
        shape, fortran_order, dtype = npformat.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran_order, dtype = npformat.read_array_header_2_0(f)
    else:
        raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]}")
    return NpyHeader(tuple(int(d) for d in shape), np.dtype(dtype), bool(fortran_order), f.tell())


def read_header_at(path: str) -> NpyHeader:
    """Parse the header of the ``.npy`` file at ``path``."""
    with open(path, "rb") as f:
        return read_header(f)
