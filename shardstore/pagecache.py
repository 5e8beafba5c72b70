"""Page-cache calls on shard files: ``madvise`` a mapped array's pages, and how much of a file is cached.

The loops are compiled (reached through ``shardstore.kernels``, the one wrapper of the extension) so the
kernel's work runs without the GIL; ``loader.pager`` decides when to read ahead and what to drop.
"""

from __future__ import annotations

import mmap
import os

import numpy as np

from shardstore import kernels


def advise_array(arr: np.ndarray, advice: int) -> bool:
    """``madvise(advice)`` the pages under a memory-mapped array, without holding the GIL; False if refused.

    ``mmap.madvise`` holds the GIL while the kernel works, and ``MADV_POPULATE_READ`` on a
    cold file reads it in: tens of milliseconds in which no other thread could run.
    """
    if not isinstance(arr, np.ndarray) or not arr.flags.c_contiguous:
        raise TypeError("advise_array needs a C-contiguous numpy.ndarray")
    if arr.nbytes == 0:
        return True
    return kernels._kernels.advise_range(arr.ctypes.data, arr.nbytes, int(advice), mmap.PAGESIZE) == 0


def resident_fraction(path: str | os.PathLike[str]) -> float:
    """Fraction of ``path``'s pages that are in the page cache (``mincore``); 1.0 for an empty file."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return 1.0
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            view = memoryview(mm)
            try:
                resident = kernels._kernels.resident_pages(view, mmap.PAGESIZE)
            finally:
                view.release()
    return resident / ((size + mmap.PAGESIZE - 1) // mmap.PAGESIZE)
