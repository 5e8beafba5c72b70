"""The manifest's data model and its JSON form (``ROOT/manifest.json``), validated on load."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shardstore.errors import ManifestError
from shardstore.store.layout import FIELD_NAME, MANIFEST_NAME

FORMAT_NAME = "shardstore-manifest"
FORMAT_VERSION = 2  # 2: fields of a group (optional per shard)
CHECKSUM_ALGORITHM = "sha256"


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


@dataclass(frozen=True)
class ShardEntry:
    """One complete, validated shard."""

    id: int
    num_samples: int
    layout: str  # "native" or "flat"
    files: dict[str, FileEntry]

    @property
    def bytes(self) -> int:
        """Bytes of all field files of the shard."""
        return sum(f.bytes for f in self.files.values())

    def field_path(self, field: str) -> str:
        """Where ``field`` of this shard lives or would live, relative to the root (``files`` is never empty)."""
        first = next(iter(self.files.values())).path
        if self.layout == "native":
            return f"{first.rsplit('/', 1)[0]}/{field}.npy"
        digits = first[: -len(".npy")].rsplit("_", 1)[1]
        return f"{field}_{digits}.npy"


@dataclass(frozen=True)
class Problem:
    """Why a shard (or a file) was left out of the manifest."""

    path: str
    reason: str
    shard_id: int | None = None

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass
class Manifest:
    """The validated contents of a cache: its fields, its shards in id order, and what was left out."""

    fields: dict[str, FieldSpec]
    shards: list[ShardEntry]
    left_out: list[Problem] = field(default_factory=list)

    def positions_with(self, fields: list[str] | tuple[str, ...]) -> list[int]:
        """Positions of the shards that have every one of ``fields``."""
        return [p for p, s in enumerate(self.shards) if all(name in s.files for name in fields)]

    @property
    def num_samples(self) -> int:
        """Samples over all shards."""
        return sum(s.num_samples for s in self.shards)

    @property
    def total_bytes(self) -> int:
        """Bytes over all shard files."""
        return sum(s.bytes for s in self.shards)

    @property
    def snapshot_id(self) -> str:
        """A short id of the shard list (ids, counts, sizes, mtimes): equal ids mean the same data."""
        h = hashlib.sha256()
        for s in self.shards:
            h.update(f"{s.id}:{s.num_samples};".encode())
            for name in sorted(s.files):
                f = s.files[name]
                h.update(f"{name}:{f.path}:{f.bytes}:{f.mtime_ns};".encode())
        return h.hexdigest()[:16]

    def to_json(self) -> str:
        """The manifest as the JSON text stored in ``manifest.json``."""
        doc = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "checksum_algorithm": CHECKSUM_ALGORITHM,
            "num_shards": len(self.shards),
            "num_samples": self.num_samples,
            "total_bytes": self.total_bytes,
            "snapshot_id": self.snapshot_id,
            "fields": {n: {"dtype": f.dtype.str, "shape": list(f.shape), **({"group": f.group} if f.group else {})}
                       for n, f in self.fields.items()},
            "shards": [
                {
                    "id": s.id,
                    "num_samples": s.num_samples,
                    "layout": s.layout,
                    "files": {
                        n: {
                            "path": f.path,
                            "bytes": f.bytes,
                            "mtime_ns": f.mtime_ns,
                            "data_offset": f.data_offset,
                            "checksum": f.checksum,
                        }
                        for n, f in s.files.items()
                    },
                }
                for s in self.shards
            ],
            "left_out": [{"shard_id": p.shard_id, "path": p.path, "reason": p.reason} for p in self.left_out],
        }
        return json.dumps(doc, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "manifest.json") -> Manifest:
        """Parse and validate manifest JSON; ``ManifestError`` naming ``source`` on any defect."""
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{source}: not valid JSON ({exc}); rebuild it with `shardstore build-manifest`") from exc
        try:
            return _parse(doc)
        except ManifestError as exc:
            raise ManifestError(f"{source}: {exc}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ManifestError(
                f"{source}: malformed entry ({type(exc).__name__}: {exc}); rebuild it with `shardstore build-manifest`"
            ) from None


def _safe_relative(path: str) -> str:
    # Plain string checks: this runs once per file of a manifest that may list tens of thousands.
    if not path or path.startswith("/") or "\\" in path or ".." in path.split("/"):
        raise ManifestError(f"file path {path!r} points outside the cache root; a manifest lists relative paths only")
    return path


def _parse(doc: Any) -> Manifest:
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise ManifestError("not a shardstore manifest; rebuild it with `shardstore build-manifest`")
    version = doc.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ManifestError(
            f"manifest format version {version!r} is newer than this shardstore reads ({FORMAT_VERSION}); "
            "upgrade shardstore or rebuild the manifest"
        )
    fields: dict[str, FieldSpec] = {}
    for name, spec in doc["fields"].items():
        if not FIELD_NAME.match(name):
            raise ManifestError(f"field name {name!r} is not allowed")
        dtype = np.dtype(str(spec["dtype"]))
        if dtype.hasobject or dtype.fields is not None:
            raise ManifestError(f"field {name!r} has dtype {dtype}, which is not allowed (no objects)")
        group = spec.get("group")
        fields[name] = FieldSpec(dtype, tuple(int(d) for d in spec["shape"]), None if group is None else str(group))
    required = {n for n, f in fields.items() if f.group is None}
    groups: dict[str, set[str]] = {}
    for n, f in fields.items():
        if f.group is not None:
            groups.setdefault(f.group, set()).add(n)
    shards = []
    for s in doc["shards"]:
        files = {
            name: FileEntry(
                path=_safe_relative(str(f["path"])),
                bytes=int(f["bytes"]),
                mtime_ns=int(f["mtime_ns"]),
                data_offset=int(f["data_offset"]),
                checksum=None if f.get("checksum") is None else str(f["checksum"]),
            )
            for name, f in s["files"].items()
        }
        names = set(files)
        partial = [g for g, members in groups.items() if names & members and not members <= names]
        if not required <= names or not names <= set(fields) or partial:
            raise ManifestError(f"shard {s['id']} lists fields {sorted(files)}, the manifest {sorted(fields)}"
                                + (f" (group {partial[0]!r} only in part)" if partial else ""))
        shards.append(ShardEntry(int(s["id"]), int(s["num_samples"]), str(s["layout"]), files))
    left_out = [Problem(str(p["path"]), str(p["reason"]), p.get("shard_id")) for p in doc.get("left_out", [])]
    return Manifest(fields, shards, left_out)


def manifest_path(root: str | Path) -> Path:
    """Where the manifest of the cache at ``root`` lives."""
    return Path(root) / MANIFEST_NAME
