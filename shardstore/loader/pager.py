"""Page-cache advice for shard files: read the next shards ahead of use, drop finished ones when asked."""

from __future__ import annotations

import logging
import mmap
import os
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

#: Linux >= 5.14: fault the pages of a mapping in now (reading them if needed), so that
#: copying out of it later does not pay a page fault per 4 KiB page.
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)


def mmap_of(arr: np.ndarray) -> mmap.mmap | None:
    """The ``mmap`` an array views, if any."""
    base = arr
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None) if not isinstance(base, memoryview) else base.obj
    return base


def _madvise(mm: mmap.mmap, advice: int) -> bool:
    try:
        mm.madvise(advice)
        return True
    except (OSError, ValueError):  # older kernels lack some advice values; the map may be closed
        return False


def _fadvise(path: Path, advice: int) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # a vanished file is reported by the gather that needs it, with its name
    try:
        os.posix_fadvise(fd, 0, 0, advice)
    finally:
        os.close(fd)


def read_ahead(arrays: list[np.ndarray], paths: list[Path], *, populate: bool = True) -> None:
    """Tell the kernel these files will be read front to back soon, and start reading them.

    ``populate`` also maps the pages into this process now (blocking until they are read),
    so the gather that follows copies at memory speed.
    """
    for path in paths:
        _fadvise(path, os.POSIX_FADV_WILLNEED)
    for arr in arrays:
        mm = mmap_of(arr)
        if mm is None:
            continue
        _madvise(mm, mmap.MADV_SEQUENTIAL)
        if not (populate and _madvise(mm, MADV_POPULATE_READ)):
            _madvise(mm, mmap.MADV_WILLNEED)


def drop_pages(arrays: list[np.ndarray], paths: list[Path]) -> None:
    """Unmap these files' pages from this process and ask the kernel to drop them from the page cache."""
    for arr in arrays:
        mm = mmap_of(arr)
        if mm is not None:
            _madvise(mm, mmap.MADV_DONTNEED)
    for path in paths:
        _fadvise(path, os.POSIX_FADV_DONTNEED)


def evict(paths: list[Path]) -> None:
    """Drop files from the page cache (benchmarks' cold runs); pages still mapped somewhere stay."""
    for path in paths:
        _fadvise(path, os.POSIX_FADV_DONTNEED)
