"""File checksums (SHA-256 of the whole file), computed on a few threads since hashing releases the GIL."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from shardstore.manifest.model import CHECKSUM_ALGORITHM

CHUNK_BYTES = 8 << 20  # matches the disk's read-ahead; large enough that hashing dominates

# One chunk buffer per thread, reused across files: allocating (and zeroing) 8 MiB per file
# would dominate a cache of many small shards.
_local = threading.local()


def _chunk_buffer() -> bytearray:
    buf = getattr(_local, "buf", None)
    if buf is None:
        buf = _local.buf = bytearray(CHUNK_BYTES)
    return buf


def file_checksum(path: Path, progress: Callable[[int], None] | None = None) -> str:
    """``"sha256:<hex>"`` of the file at ``path``; ``progress`` is called with each chunk's byte count."""
    h = hashlib.new(CHECKSUM_ALGORITHM)
    buf = _chunk_buffer()
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            if progress is not None:
                progress(n)
    return f"{CHECKSUM_ALGORITHM}:{h.hexdigest()}"


def checksum_files(
    paths: Iterable[Path],
    *,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[Path, str | OSError]:
    """Checksum every path; a file that cannot be read maps to its ``OSError`` instead of a digest."""
    paths = list(paths)
    workers = workers or min(4, os.cpu_count() or 1)

    def one(path: Path) -> str | OSError:
        try:
            return file_checksum(path, progress)
        except OSError as exc:
            return exc

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(zip(paths, pool.map(one, paths)))
