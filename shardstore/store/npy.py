"""Reading ``.npy`` headers with NumPy's own ``numpy.lib.format`` readers (no data is read)."""

from __future__ import annotations

import io
import math
import os
import threading
from dataclasses import dataclass
from functools import lru_cache
from typing import IO

import numpy as np
from numpy.lib import format as npformat

from shardstore.errors import ShardstoreError

MAGIC = b"\x93NUMPY"
MAX_HEADER_BYTES = 10_000  # NumPy's own default limit for untrusted headers

# NumPy parses a header with ``ast.literal_eval``, and CPython 3.11 builds AST objects with a recursion counter
# that threads share: two threads parsing at once can fail with "SystemError: AST constructor recursion depth
# mismatch". Every header parse and ``np.load`` here holds this lock (headers are cached, loads map: it is short).
_PARSE_LOCK = threading.Lock()


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
    with _PARSE_LOCK:
        shape, fortran_order, dtype = reader(f)
    return tuple(int(d) for d in shape), bool(fortran_order), np.dtype(dtype)


def load_array(file: str | os.PathLike[str] | IO[bytes], *, mmap: bool = False) -> np.ndarray:
    """``np.load`` of a plain array (never a pickle), memory-mapped read-only with ``mmap``, safe in any thread."""
    with _PARSE_LOCK:
        return np.load(file, mmap_mode="r" if mmap else None, allow_pickle=False)


class NotNpyError(ValueError):
    """The bytes are not an ``.npy`` file at all (empty, or without the magic), as opposed to a damaged header."""


def read_header_bytes(head: bytes) -> NpyHeader:
    """Parse a header from the first bytes of a file (at least the whole header; extra bytes are ignored)."""
    if not head:
        raise NotNpyError("empty file (0 bytes)")
    if len(head) < 8 or head[:6] != MAGIC:
        # Only the name of what was found, never advice to unpickle: a cache is someone else's data.
        raise NotNpyError(f"not an .npy file (it starts with {head[:8]!r}, not the .npy magic {MAGIC!r})")
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


def read_head_fd(fd: int) -> tuple[bytes, os.stat_result]:
    """The first bytes of the open file ``fd`` and its stat, in one fstat/pread (the scan's hot path)."""
    st = os.fstat(fd)
    head = os.pread(fd, HEAD_BYTES, 0)
    if len(head) == HEAD_BYTES and len(head) < st.st_size:
        # A header longer than a page: give the parser everything it may ask for.
        head += os.pread(fd, MAX_HEADER_BYTES + 16 - HEAD_BYTES, HEAD_BYTES)
    return head, st


def read_head(path: str) -> tuple[bytes, os.stat_result]:
    """The first bytes of ``path`` and the stat of that very file (which may be replaced meanwhile)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return read_head_fd(fd)
    finally:
        os.close(fd)


def header_problem(header: NpyHeader, size: int) -> str | None:
    """Why an array with this header cannot be a field read row by row from a file of ``size`` bytes, or None."""
    if header.dtype.hasobject:
        return f"dtype {header.dtype} holds Python objects, which are never loaded (no pickle); store numeric arrays"
    if header.dtype.fields is not None or header.dtype.subdtype is not None:
        return f"structured dtype {header.dtype} is not supported; store one plain array per field"
    if not header.shape:
        return "holds a 0-d array; a field needs a first (sample) dimension"
    if header.fortran_order and len(header.shape) > 1:
        return "is stored in Fortran order, which cannot be read row by row; re-save it with np.ascontiguousarray"
    need = header.file_bytes
    if size < need:
        return f"header promises {need:,} bytes, file has {size:,} (truncated)"
    if size > need:
        return f"header promises {need:,} bytes, file has {size:,} ({size - need:,} unexpected bytes after the data)"
    return None


def open_npy(path: str | os.PathLike[str]) -> np.ndarray:
    """Map the ``.npy`` array at ``path`` read-only, or ``ShardstoreError`` saying in one line what the file is.

    For input files a user names (``--from-npy``): an empty file, a text file or an object
    array each get their own message; nothing is ever unpickled.
    """
    where = os.fspath(path)
    try:
        head, st = read_head(where)
    except FileNotFoundError:
        raise ShardstoreError(f"{where}: no such file; pass FIELD=PATH for an existing .npy file") from None
    except OSError as exc:
        raise ShardstoreError(f"{where}: cannot be read ({exc.strerror or exc})") from None
    try:
        header = read_header_bytes(head)
    except NotNpyError as exc:
        raise ShardstoreError(f"{where}: {exc}; pass a file written by numpy.save") from None
    except Exception as exc:  # noqa: BLE001 - any parse failure of foreign bytes is one line, never a traceback
        raise ShardstoreError(f"{where}: unreadable .npy header ({' '.join(str(exc).split())}); "
                              "pass a file written by numpy.save") from None
    if header.dtype.hasobject:
        raise ShardstoreError(f"{where}: dtype {header.dtype} holds Python objects, which are never loaded "
                              "(no pickle); save a numeric array")
    if st.st_size < header.file_bytes:
        raise ShardstoreError(f"{where}: header promises {header.file_bytes:,} bytes, file has {st.st_size:,} "
                              "(truncated); write the file again")
    try:
        return load_array(where, mmap=True)
    except (OSError, ValueError) as exc:  # changed since the header was read
        raise ShardstoreError(f"{where}: not a readable .npy array ({' '.join(str(exc).split())})") from None
