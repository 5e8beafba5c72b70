"""The columns of a new snapshot: rows of the shards read in this build, merged by id with the previous table's rows.

Rows read are appended shard by shard into plain lists (a few list appends per file) and
turned into arrays once; kept rows are taken from the previous columns with one fancy index
per column. Neither side builds a Python object per shard.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from shardstore.manifest.scan import FileInfo
from shardstore.store.manifest import (
    BASE_COLUMNS,
    DIGEST_BYTES,
    FIELD_COLUMNS,
    LAYOUTS,
    NO_RANGE,
    RANGE_COLUMNS,
    FieldSpec,
    digest_bytes,
    label_like,
)


def column_dtypes(fields: dict[str, FieldSpec], digests: Iterable[str]) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """Every column a table of ``fields`` has (with a checksum column for each of ``digests``): dtype, row shape."""
    out: dict[str, tuple[np.dtype, tuple[int, ...]]] = {n: (d, ()) for n, d in BASE_COLUMNS.items()}
    for name, spec in fields.items():
        for suffix, dtype in FIELD_COLUMNS.items():
            out[f"{name}.{suffix}"] = (dtype, ())
        if label_like(spec):
            for suffix, dtype in RANGE_COLUMNS.items():
                out[f"{name}.{suffix}"] = (dtype, ())
    for name in digests:
        if name in fields:
            out[f"{name}.sha256"] = (np.dtype(np.uint8), (DIGEST_BYTES,))
    return out


def _default(column: str, dtype: np.dtype, row: tuple[int, ...], n: int) -> np.ndarray:
    if column.endswith(".min"):
        return np.full(n, NO_RANGE[0], dtype)
    if column.endswith(".max"):
        return np.full(n, NO_RANGE[1], dtype)
    return np.zeros((n, *row), dtype)


class Rows:
    """The table rows of the shards read in this build, filled one shard at a time."""

    def __init__(self, fields: dict[str, FieldSpec]) -> None:
        self.fields = fields
        self.ids: list[int] = []
        self.samples: list[int] = []
        self.layouts: list[int] = []
        self.digits: list[int] = []
        self.offsets: dict[str, list[int]] = {n: [] for n in fields}
        self.mtimes: dict[str, list[int]] = {n: [] for n in fields}
        #: (row, low, high) of label-like files with a recorded range; (row, digest) of files with a checksum
        self.ranges: dict[str, list[tuple[int, int, int]]] = {n: [] for n in fields}
        #: (first row, low, high) of a block of rows added at once
        self.range_blocks: dict[str, list[tuple[int, np.ndarray, np.ndarray]]] = {n: [] for n in fields}
        self.checksums: dict[str, list[tuple[int, str]]] = {n: [] for n in fields}

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, shard_id: int, samples: int, layout: str, digits: int, files: dict[str, FileInfo]) -> None:
        row = len(self.ids)
        self.ids.append(shard_id)
        self.samples.append(samples)
        self.layouts.append(LAYOUTS.index(layout))
        self.digits.append(digits)
        for name in self.fields:
            info = files.get(name)
            if info is None:
                self.offsets[name].append(0)
                self.mtimes[name].append(0)
                continue
            self.offsets[name].append(info.header.data_offset)
            self.mtimes[name].append(info.mtime_ns)
            if info.value_range is not None:
                self.ranges[name].append((row, *info.value_range))
            if info.checksum is not None:
                self.checksums[name].append((row, info.checksum))

    def add_many(self, ids: list[int], samples: int, layout: str, digits: int,
                 files: dict[str, tuple[int, list[int], tuple[np.ndarray, np.ndarray] | None]]) -> None:
        """Rows of shards that share everything but their ids, mtimes and value ranges.

        ``files`` maps a field to its data offset, the mtime of each shard's file, and the
        (low, high) value range of each (None: not recorded).
        """
        start = len(self.ids)
        n = len(ids)
        self.ids.extend(ids)
        self.samples.extend([samples] * n)
        self.layouts.extend([LAYOUTS.index(layout)] * n)
        self.digits.extend([digits] * n)
        for name in self.fields:
            entry = files.get(name)
            if entry is None:
                self.offsets[name].extend([0] * n)
                self.mtimes[name].extend([0] * n)
                continue
            offset, mtimes, ranges = entry
            self.offsets[name].extend([offset] * n)
            self.mtimes[name].extend(mtimes)
            if ranges is not None:
                self.range_blocks[name].append((start, *ranges))

    def digests(self) -> set[str]:
        """Fields with a checksum in any row."""
        return {n for n, rows in self.checksums.items() if rows}

    def columns(self, layout: dict[str, tuple[np.dtype, tuple[int, ...]]], since: np.ndarray) -> dict[str, np.ndarray]:
        """The rows as columns of ``layout`` (see ``column_dtypes``), with ``since`` per row."""
        n = len(self.ids)
        cols = {name: _default(name, dtype, row, n) for name, (dtype, row) in layout.items()}
        cols["id"][:] = self.ids
        cols["samples"][:] = self.samples
        cols["layout"][:] = self.layouts
        cols["digits"][:] = self.digits
        cols["since"][:] = since
        for name in self.fields:
            cols[f"{name}.offset"][:] = self.offsets[name]
            cols[f"{name}.mtime_ns"][:] = self.mtimes[name]
            if self.ranges[name] and f"{name}.min" in cols:
                rows, low, high = (np.array(x, np.int64) for x in zip(*self.ranges[name]))
                cols[f"{name}.min"][rows], cols[f"{name}.max"][rows] = low, high
            if f"{name}.min" in cols:
                for start, low, high in self.range_blocks[name]:
                    cols[f"{name}.min"][start:start + len(low)] = low
                    cols[f"{name}.max"][start:start + len(high)] = high
            if self.checksums[name] and f"{name}.sha256" in cols:
                digest = cols[f"{name}.sha256"]
                for row, text in self.checksums[name]:
                    digest[row] = np.frombuffer(digest_bytes(text), np.uint8)
        return cols


def kept_columns(previous: dict[str, np.ndarray], positions: np.ndarray,
                 layout: dict[str, tuple[np.dtype, tuple[int, ...]]]) -> dict[str, np.ndarray]:
    """The previous table's rows at ``positions`` as columns of ``layout`` (defaults for columns it lacks)."""
    n = len(positions)
    out = {}
    for name, (dtype, row) in layout.items():
        col = previous.get(name)
        if col is None:
            out[name] = _default(name, dtype, row, n)
        else:
            out[name] = np.asarray(col)[positions].astype(dtype, copy=False)
    return out


def merge(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The rows of ``a`` and ``b`` (same columns, disjoint ids) in id order."""
    if not len(b["id"]):
        return a
    if not len(a["id"]):
        return b
    order = np.argsort(np.concatenate([a["id"], b["id"]]), kind="stable")
    return {name: np.concatenate([a[name], b[name]])[order] for name in a}


def take(cols: dict[str, np.ndarray], mask: np.ndarray) -> dict[str, np.ndarray]:
    return {name: col[mask] for name, col in cols.items()}
