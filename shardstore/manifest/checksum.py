"""File checksums (SHA-256 of the whole file), computed on a few threads since hashing releases the GIL."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from shardstore.store.layout import OutsideRootError, open_within
from shardstore.store.manifest import CHECKSUM_ALGORITHM

CHUNK_BYTES = 8 << 20  # matches the disk's read-ahead; large enough that hashing dominates

# One chunk buffer per thread, reused across files: allocating (and zeroing) 8 MiB per file
# would dominate a cache of many small shards.
_local = threading.local()


def _chunk_buffer() -> bytearray:
    buf = getattr(_local, "buf", None)
    if buf is None:
        buf = _local.buf = bytearray(CHUNK_BYTES)
    return buf


def fd_checksum(fd: int, progress: Callable[[int], None] | None = None) -> str:
    """``"sha256:<hex>"`` of the whole open file ``fd`` (read from its start, whatever its position)."""
    h = hashlib.new(CHECKSUM_ALGORITHM)
    buf = _chunk_buffer()
    view = memoryview(buf)
    offset = 0
    while n := os.preadv(fd, [buf], offset):
        h.update(view[:n])
        offset += n
        if progress is not None:
            progress(n)
    return f"{CHECKSUM_ALGORITHM}:{h.hexdigest()}"


def file_checksum(path: Path, progress: Callable[[int], None] | None = None, *,
                  resolved_root: str | None = None) -> str:
    """``"sha256:<hex>"`` of the file at ``path``; ``progress`` is called with each chunk's byte count.

    With ``resolved_root`` (a cache's realpath) a path that resolves outside it is refused
    with ``OutsideRootError`` before anything is read.
    """
    if resolved_root is None:
        fd = os.open(path, os.O_RDONLY)
    else:
        fd = open_within(resolved_root, path, os.path.relpath(path, resolved_root))
    try:
        return fd_checksum(fd, progress)
    finally:
        os.close(fd)


def checksum_files(
    paths: Iterable[Path],
    *,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
    resolved_root: str | None = None,
) -> dict[Path, str | OSError | OutsideRootError]:
    """Checksum every path; a file that cannot be read (or lies outside ``resolved_root``) maps to the error."""
    paths = list(paths)
    workers = workers or min(4, os.cpu_count() or 1)

    def one(path: Path) -> str | OSError | OutsideRootError:
        try:
            return file_checksum(path, progress, resolved_root=resolved_root)
        except (OSError, OutsideRootError) as exc:
            return exc

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(zip(paths, pool.map(one, paths)))
