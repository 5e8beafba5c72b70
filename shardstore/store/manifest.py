"""The manifest's data model: a cache's fields, and one row per shard in a columnar table of NumPy arrays.

A cache of a million shards must open in milliseconds in every rank and every DataLoader
worker, so per-shard facts live in arrays (memory-mapped from ``ROOT/manifest.d/<snapshot>/``
when read from disk), never in one Python object per shard. The columns:

======================  =========  =========================================================
column                  dtype      meaning
======================  =========  =========================================================
``id``                  int64      shard id (strictly increasing: a shard's *position* is its row)
``samples``             int64      rows of every field file of the shard
``layout``              uint8      0 native (``shard_<id>/<field>.npy``), 1 flat (``<field>_<id>.npy``)
``digits``              uint8      width of the id in the file name (``shard_42`` is 2, ``shard_000042`` 6)
``since``               uint32     the manifest generation that first listed the shard
``<field>.offset``      uint32     where the array data starts in the file; 0: the shard lacks the field
``<field>.mtime_ns``    int64      the file's mtime when the manifest was built
``<field>.min/.max``    int64      smallest/largest value of a label-like field (min > max: not recorded)
``<field>.sha256``      uint8[32]  the file's SHA-256 (all zeros: none recorded)
======================  =========  =========================================================

A file's size is not stored: it is ``offset + samples * sample_bytes``, which every reader
checks against the file when it maps it. Paths are derived from the id, the digits and the
layout. ``ShardEntry``/``FileEntry`` are views of one row, built on demand for code that
wants objects (the CLI, checks, tests); hot paths use the columns.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import overload

import numpy as np

FORMAT_NAME = "shardstore-manifest"
FORMAT_VERSION = 3  # 3: a JSON header and a columnar table; 2: JSON with fields of a group; 1: JSON
CHECKSUM_ALGORITHM = "sha256"
LAYOUTS = ("native", "flat")
NO_RANGE = (1, 0)  # min > max: no value range recorded

BASE_COLUMNS: dict[str, np.dtype] = {
    "id": np.dtype(np.int64),
    "samples": np.dtype(np.int64),
    "layout": np.dtype(np.uint8),
    "digits": np.dtype(np.uint8),
    "since": np.dtype(np.uint32),
}
FIELD_COLUMNS: dict[str, np.dtype] = {"offset": np.dtype(np.uint32), "mtime_ns": np.dtype(np.int64)}
RANGE_COLUMNS: dict[str, np.dtype] = {"min": np.dtype(np.int64), "max": np.dtype(np.int64)}
DIGEST_BYTES = 32


@dataclass(frozen=True)
class FieldSpec:
    """One field of every sample: its dtype and per-sample shape (the shape after the first dimension)."""

    dtype: np.dtype
    shape: tuple[int, ...]
    #: the field group it belongs to (``ROOT/<group>.fields.json``); such a field may be absent from a shard
    group: str | None = None

    @property
    def sample_bytes(self) -> int:
        """Bytes one sample of this field takes on disk."""
        return math.prod(self.shape) * self.dtype.itemsize

    def describe(self) -> str:
        """Short form such as ``uint8[3, 64, 64]``."""
        return f"{self.dtype.name}[{', '.join(map(str, self.shape))}]"


@dataclass(frozen=True)
class FileEntry:
    """One field file of a shard as it was when the manifest was built."""

    path: str  # relative to the cache root, POSIX separators
    bytes: int
    mtime_ns: int
    data_offset: int  # where the array data starts (after the .npy header)
    checksum: str | None = None  # "sha256:<hex>" when built with --checksum
    #: smallest and largest value of a label-like field (integers, one per sample), read at build time
    value_range: tuple[int, int] | None = None


@dataclass(frozen=True)
class ShardEntry:
    """One complete, validated shard (a view of one row of the table, or a row about to be added)."""

    id: int
    num_samples: int
    layout: str  # "native" or "flat"
    files: dict[str, FileEntry]
    digits: int = 6
    since: int = 0

    @property
    def bytes(self) -> int:
        """Bytes of all field files of the shard."""
        return sum(f.bytes for f in self.files.values())

    def field_path(self, field: str) -> str:
        """Where ``field`` of this shard lives or would live, relative to the root."""
        return shard_file_path(self.layout, self.id, self.digits, field)


@dataclass(frozen=True)
class Problem:
    """Why a shard (or a file) was left out of the manifest."""

    path: str
    reason: str
    shard_id: int | None = None

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def shard_file_path(layout: str, shard_id: int, digits: int, field: str) -> str:
    """The path of ``field`` of a shard, relative to the root, in ``layout``."""
    name = str(shard_id).zfill(digits)
    return f"shard_{name}/{field}.npy" if layout == "native" else f"{field}_{name}.npy"


def digest_text(row: np.ndarray) -> str | None:
    """``sha256:<hex>`` of one digest row, or None for the all-zero row (none recorded)."""
    raw = bytes(row)
    return None if raw == bytes(DIGEST_BYTES) else f"{CHECKSUM_ALGORITHM}:{raw.hex()}"


def digest_bytes(text: str | None) -> bytes:
    return bytes(DIGEST_BYTES) if text is None else bytes.fromhex(text.split(":", 1)[1])


def label_like(spec: FieldSpec) -> bool:
    """Integers, one per sample: the fields whose value range is recorded (labels, ids)."""
    return spec.dtype.kind in "iu" and spec.shape in ((), (1,))


def empty_columns(fields: dict[str, FieldSpec], num_shards: int, *,
                  digests: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Zeroed columns for ``num_shards`` rows (ranges set to 'none')."""
    cols = {name: np.zeros(num_shards, dtype) for name, dtype in BASE_COLUMNS.items()}
    cols["digits"][:] = 6
    for name, spec in fields.items():
        for suffix, dtype in FIELD_COLUMNS.items():
            cols[f"{name}.{suffix}"] = np.zeros(num_shards, dtype)
        if label_like(spec):
            cols[f"{name}.min"] = np.full(num_shards, NO_RANGE[0], np.int64)
            cols[f"{name}.max"] = np.full(num_shards, NO_RANGE[1], np.int64)
    for name in digests:
        cols[f"{name}.sha256"] = np.zeros((num_shards, DIGEST_BYTES), np.uint8)
    return cols


def columns_from_entries(fields: dict[str, FieldSpec], shards: Sequence[ShardEntry]) -> dict[str, np.ndarray]:
    """The table of ``shards`` (ShardEntry objects, in id order)."""
    digests = [n for n in fields if any(n in s.files and s.files[n].checksum for s in shards)]
    cols = empty_columns(fields, len(shards), digests=digests)
    for p, s in enumerate(shards):
        cols["id"][p] = s.id
        cols["samples"][p] = s.num_samples
        cols["layout"][p] = LAYOUTS.index(s.layout)
        cols["digits"][p] = s.digits
        cols["since"][p] = s.since
        for name, f in s.files.items():
            cols[f"{name}.offset"][p] = f.data_offset
            cols[f"{name}.mtime_ns"][p] = f.mtime_ns
            if f.value_range is not None and f"{name}.min" in cols:
                cols[f"{name}.min"][p], cols[f"{name}.max"][p] = f.value_range
            if f.checksum and f"{name}.sha256" in cols:
                cols[f"{name}.sha256"][p] = np.frombuffer(digest_bytes(f.checksum), np.uint8)
    return cols


class ShardList(Sequence[ShardEntry]):
    """The shards of a manifest as ``ShardEntry`` objects, each built when asked for (the table stays columnar)."""

    def __init__(self, manifest: Manifest) -> None:
        self._m = manifest

    def __len__(self) -> int:
        return self._m.num_shards

    @overload
    def __getitem__(self, i: int) -> ShardEntry: ...
    @overload
    def __getitem__(self, i: slice) -> list[ShardEntry]: ...

    def __getitem__(self, i: int | slice) -> ShardEntry | list[ShardEntry]:
        if isinstance(i, slice):
            return [self._m.entry(p) for p in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"shard position {i} is out of range [0, {n})")
        return self._m.entry(i % n if i < 0 else i)

    def __iter__(self) -> Iterator[ShardEntry]:
        return (self._m.entry(p) for p in range(len(self)))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and len(self) == len(other) and all(a == b for a, b in zip(self, other))

    def __repr__(self) -> str:
        return f"<{len(self)} shards>"


class Manifest:
    """The validated contents of a cache: its fields, one table row per shard in id order, and what was left out.

    Build one from ``ShardEntry`` objects (``Manifest(fields, shards, left_out)``) or from
    columns (``Manifest(fields, columns=...)``); either way it holds only the columns.
    """

    def __init__(self, fields: dict[str, FieldSpec], shards: Sequence[ShardEntry] | None = None,
                 left_out: list[Problem] | None = None, *, columns: dict[str, np.ndarray] | None = None,
                 generation: int = 0, snapshot_id: str | None = None, source: object = None) -> None:
        if columns is None:
            columns = columns_from_entries(fields, list(shards or []))
        elif shards is not None:
            raise TypeError("give shards or columns, not both")
        self.fields = dict(fields)
        self.columns = columns
        self.left_out = list(left_out or [])
        #: how many builds have written this cache's manifest (the ``since`` of shards it added)
        self.generation = generation
        self._snapshot_id = snapshot_id
        #: (root, table directory) when the columns are the unmodified table of that snapshot on disk
        self.source = source
        self._num_samples: int | None = None
        #: the format it was read in (1 and 2: all JSON, converted to 3 by the next build)
        self.format_version = FORMAT_VERSION

    # -- columns -----------------------------------------------------------------------------

    @property
    def ids(self) -> np.ndarray:
        """Shard ids by position (int64, read-only when memory-mapped)."""
        return self.columns["id"]

    @property
    def counts(self) -> np.ndarray:
        """Samples of each shard by position (int64)."""
        return self.columns["samples"]

    @property
    def num_shards(self) -> int:
        return int(self.columns["id"].shape[0])

    @property
    def shards(self) -> ShardList:
        """The shards in id order as ``ShardEntry`` views; a shard's *position* is its index."""
        return ShardList(self)

    def has(self, field: str) -> np.ndarray:
        """Bool per position: whether the shard has ``field`` (a group field may be missing)."""
        if field not in self.fields:
            raise KeyError(f"no field {field!r}; the cache has {sorted(self.fields)}")
        return self.columns[f"{field}.offset"] != 0

    def positions_with(self, fields: list[str] | tuple[str, ...]) -> np.ndarray:
        """Positions of the shards that have every one of ``fields``."""
        mask = np.ones(self.num_shards, bool)
        for name in fields:
            mask &= self.has(name)
        return np.flatnonzero(mask)

    def complete_fields(self) -> dict[str, FieldSpec]:
        """The fields every shard has (own fields always; a group's when no shard lacks it)."""
        return {n: f for n, f in self.fields.items() if f.group is None or bool(self.has(n).all())}

    def layout(self, position: int) -> str:
        return LAYOUTS[int(self.columns["layout"][position])]

    def file_path(self, position: int, field: str) -> str:
        """Where ``field`` of the shard at ``position`` lives, relative to the root."""
        c = self.columns
        return shard_file_path(LAYOUTS[int(c["layout"][position])], int(c["id"][position]),
                               int(c["digits"][position]), field)

    def file_bytes(self, position: int, field: str) -> int:
        """The size the file of ``field`` at ``position`` has: its header plus its rows."""
        rows_bytes = int(self.counts[position]) * self.fields[field].sample_bytes
        return int(self.columns[f"{field}.offset"][position]) + rows_bytes

    def checksum(self, position: int, field: str) -> str | None:
        col = self.columns.get(f"{field}.sha256")
        return None if col is None else digest_text(col[position])

    def value_range(self, position: int, field: str) -> tuple[int, int] | None:
        low = self.columns.get(f"{field}.min")
        if low is None:
            return None
        lo, hi = int(low[position]), int(self.columns[f"{field}.max"][position])
        return None if lo > hi else (lo, hi)

    def entry(self, position: int) -> ShardEntry:
        """The shard at ``position`` as a ``ShardEntry`` (built now; not for hot loops)."""
        c = self.columns
        files = {}
        for name in self.fields:
            offset = int(c[f"{name}.offset"][position])
            if offset:
                files[name] = FileEntry(self.file_path(position, name), self.file_bytes(position, name),
                                        int(c[f"{name}.mtime_ns"][position]), offset,
                                        self.checksum(position, name), self.value_range(position, name))
        return ShardEntry(int(c["id"][position]), int(c["samples"][position]), self.layout(position), files,
                          int(c["digits"][position]), int(c["since"][position]))

    # -- totals ------------------------------------------------------------------------------

    @property
    def num_samples(self) -> int:
        """Samples over all shards."""
        if self._num_samples is None:
            self._num_samples = int(self.counts.sum())
        return self._num_samples

    @property
    def total_bytes(self) -> int:
        """Bytes over all shard files."""
        return sum(int(self.file_sizes(name).sum()) for name in self.fields)

    def checksummed(self, field: str) -> np.ndarray:
        """Bool per position: whether a checksum is recorded for the shard's ``field`` file."""
        col = self.columns.get(f"{field}.sha256")
        if col is None:
            return np.zeros(self.num_shards, bool)
        return np.asarray(col).any(axis=1)

    def file_sizes(self, field: str) -> np.ndarray:
        """Size of each shard's ``field`` file (0 where the shard lacks it), int64."""
        offsets = np.asarray(self.columns[f"{field}.offset"], np.int64)
        return np.where(offsets != 0, offsets + np.asarray(self.counts) * self.fields[field].sample_bytes, 0)

    @property
    def snapshot_id(self) -> str:
        """A short id of the shard table (ids, counts, layout, offsets, mtimes): equal ids mean the same data."""
        if self._snapshot_id is None:
            self._snapshot_id = table_digest(self.fields, self.columns)
        return self._snapshot_id

    def plan_id(self) -> str:
        """A short id of what an epoch plan depends on: the shard ids and their sample counts, in order."""
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.ids, np.int64).tobytes())
        h.update(np.ascontiguousarray(self.counts, np.int64).tobytes())
        return h.hexdigest()[:16]

    # -- JSON (formats 1 and 2) ----------------------------------------------------------------

    @classmethod
    def from_json(cls, text: str, source: str = "manifest.json") -> Manifest:
        """Parse manifest JSON of any format; format 3 needs ``source``, the header's path, to find its table."""
        from shardstore.store.manifest_json import checked, load_document, parse_legacy
        from shardstore.store.snapshot import parse_snapshot_text

        doc = load_document(text, source)
        if isinstance(doc, dict) and doc.get("version") == FORMAT_VERSION:
            return parse_snapshot_text(doc, source)
        return checked(source, parse_legacy, doc)

    def to_json(self) -> str:
        """The manifest as a format-2 JSON document (every shard a dict): for small caches, tests and downgrades."""
        from shardstore.store.manifest_json import to_legacy_json

        return to_legacy_json(self)

    # -- derived manifests -------------------------------------------------------------------

    def take(self, positions: np.ndarray) -> Manifest:
        """The rows at ``positions`` (increasing), as a new manifest with copied columns."""
        cols = {name: np.ascontiguousarray(col[positions]) for name, col in self.columns.items()}
        return Manifest(self.fields, columns=cols, generation=self.generation)

    def with_fields(self, fields: dict[str, FieldSpec]) -> Manifest:
        """The same rows described by ``fields`` (a subset of the fields, or other dtypes of the same size)."""
        keep = {"id", "samples", "layout", "digits", "since"}
        cols = {name: col for name, col in self.columns.items() if name in keep or name.split(".", 1)[0] in fields}
        out = Manifest(fields, columns=cols, left_out=self.left_out, generation=self.generation,
                       snapshot_id=self._snapshot_id, source=self.source)
        out._num_samples = self._num_samples
        return out

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Manifest):
            return NotImplemented
        return (self.fields == other.fields and self.left_out == other.left_out
                and self.columns.keys() == other.columns.keys()
                and all(np.array_equal(self.columns[k], other.columns[k]) for k in self.columns))

    def __repr__(self) -> str:
        return f"Manifest({self.num_shards} shards, fields={list(self.fields)})"


def table_digest(fields: dict[str, FieldSpec], columns: dict[str, np.ndarray]) -> str:
    """Hash of the columns that say which bytes a reader gets (not checksums, ranges or ``since``)."""
    h = hashlib.sha256()
    for name in ("id", "samples", "layout", "digits"):
        h.update(np.ascontiguousarray(columns[name]).tobytes())
    for name in sorted(fields):
        spec = fields[name]
        h.update(f"{name}:{spec.dtype.str}:{list(spec.shape)};".encode())
        for suffix in ("offset", "mtime_ns"):
            h.update(np.ascontiguousarray(columns[f"{name}.{suffix}"]).tobytes())
    return h.hexdigest()[:16]

