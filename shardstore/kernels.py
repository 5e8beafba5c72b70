"""The only importer of the compiled ``cshard`` module: argument checks in Python, loops in Cython."""

from __future__ import annotations

import numpy as np

try:
    from cshard import _kernels
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "shardstore's compiled extension is not built; run `pip install -e .` "
        f"(with a C compiler, Cython and NumPy available) and check its output ({exc})"
    ) from exc


def _int64_vector(name: str, value: np.ndarray) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray of int64, got {type(value).__name__}")
    if value.dtype != np.int64 or value.ndim != 1:
        raise TypeError(f"{name} must be a 1-D int64 array, got {value.ndim}-D {value.dtype}")
    return np.ascontiguousarray(value)


def locate_rows(sample_ids: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(shard_position, row)`` for each global sample id.

    ``offsets[p]`` is the global id of shard position ``p``'s first sample and
    ``offsets[-1]`` the total sample count. Raises ``IndexError`` for ids out of range.
    """
    ids = _int64_vector("sample_ids", sample_ids)
    offs = _int64_vector("offsets", offsets)
    if offs.size == 0:
        raise ValueError("offsets must hold at least the total count (one entry)")
    shard_position = np.empty(ids.size, dtype=np.int64)
    row = np.empty(ids.size, dtype=np.int64)
    bad = _kernels.locate_rows(ids, offs, shard_position, row)
    if bad:
        first = int(ids[shard_position < 0][0])
        raise IndexError(f"sample id {first} is out of range [0, {int(offs[-1])}) ({bad} ids out of range)")
    return shard_position, row
