"""Page-cache advice for shard files: read the next shards ahead of use, drop finished ones when asked."""

from __future__ import annotations

import logging
import mmap
import os
import threading
import weakref
from pathlib import Path

import numpy as np

from shardstore import kernels, pagecache

log = logging.getLogger(__name__)

#: Linux >= 5.14: fault the pages of a mapping in now (reading them if needed), so that
#: copying out of it later does not pay a page fault per 4 KiB page.
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)


def _advise(arr: np.ndarray, advice: int) -> bool:
    """Advise the pages under a memory-mapped array (others are left alone); False if refused.

    Never faults: ``madvise`` reports a file that shrank under its map as an error (EFAULT for
    ``MADV_POPULATE_READ``) instead of SIGBUS, and the gather that needs it names the file.
    """
    try:
        return kernels.file_map_of(arr) is not None and pagecache.advise_array(arr, advice)
    except (OSError, ValueError, TypeError):
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


#: Maps whose pages this process populated: they stay mapped in while the map lives (the store's cache
#: hands the same array out again), so populating them again would only walk their page tables
#: (about 1 ms per 25 MB file on the 2-core VMs: 15% of an epoch's CPU when maps are reused).
_populated: dict[int, weakref.ref[np.ndarray]] = {}  # by id(): arrays are not hashable
_populated_lock = threading.Lock()


def _was_populated(arr: np.ndarray) -> bool:
    with _populated_lock:
        ref = _populated.get(id(arr))
        return ref is not None and ref() is arr


def _mark_populated(arr: np.ndarray, populated: bool) -> None:
    key = id(arr)

    def forget(ref: weakref.ref[np.ndarray]) -> None:
        with _populated_lock:
            if _populated.get(key) is ref:
                del _populated[key]

    with _populated_lock:
        if populated:
            _populated[key] = weakref.ref(arr, forget)
        else:
            _populated.pop(key, None)


def read_ahead(arrays: list[np.ndarray], paths: list[Path], *, populate: bool = True) -> None:
    """Tell the kernel these files will be read front to back soon, and start reading them.

    ``populate`` also maps the pages into this process now (blocking until they are read,
    the GIL released), so the gather that follows copies at memory speed instead of taking a
    page fault per 4 KiB page of a fresh map; a map populated before is left alone.
    """
    for path in paths:
        _fadvise(path, os.POSIX_FADV_WILLNEED)
    for arr in arrays:
        if populate and _was_populated(arr):
            continue
        _advise(arr, mmap.MADV_SEQUENTIAL)
        if populate and _advise(arr, MADV_POPULATE_READ):
            _mark_populated(arr, True)
        else:  # Linux < 5.14 refuses it
            _advise(arr, mmap.MADV_WILLNEED)


def drop_pages(arrays: list[np.ndarray], paths: list[Path]) -> None:
    """Unmap these files' pages from this process and ask the kernel to drop them from the page cache."""
    for arr in arrays:
        _mark_populated(arr, False)
        _advise(arr, mmap.MADV_DONTNEED)
    evict(paths)


def evict(paths: list[Path]) -> None:
    """Drop files from the page cache (benchmarks' cold runs); pages still mapped somewhere stay."""
    for path in paths:
        _fadvise(path, os.POSIX_FADV_DONTNEED)
