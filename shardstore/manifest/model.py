"""The manifest's data model and its JSON form (``ROOT/manifest.json``), validated on load."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shardstore.errors import ManifestError
from shardstore.store.layout import FIELD_NAME, FLAT_FILE, MANIFEST_NAME, MAX_SHARD_ID, NATIVE_DIR, NATIVE_FILE, parse_shard_id

FORMAT_NAME = "shardstore-manifest"
FORMAT_VERSION = 2  # 2: fields of a group (optional per shard)
CHECKSUM_ALGORITHM = "sha256"
CHECKSUM = re.compile(rf"^{CHECKSUM_ALGORITHM}:[0-9a-f]{{64}}$")
MAX_INT64 = 2**63 - 1


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
                            **({"min": f.value_range[0], "max": f.value_range[1]} if f.value_range else {}),
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
        """Parse and validate manifest JSON; ``ManifestError`` naming ``source`` on any defect.

        The text may come from someone else: every number must be an integer in range, every
        path one of the two layouts inside the root, every shard and file listed once, and each
        file's size must equal its header plus its rows; anything else is one line, never a crash.
        """
        root = os.path.dirname(source) if source.endswith(MANIFEST_NAME) else ""
        fix = f"rebuild it with `shardstore build-manifest{' ' + root if root else ''}`"
        try:
            doc = json.loads(text)
        except RecursionError:
            raise ManifestError(f"{source}: nested too deeply to be a manifest; {fix}") from None
        except ValueError as exc:  # JSONDecodeError, or an integer of thousands of digits
            raise ManifestError(f"{source}: not valid JSON ({_one_line(exc)}); {fix}") from None
        try:
            return _parse(doc)
        except ManifestError as exc:
            sep = " " if str(exc).endswith(", or") else "; "
            raise ManifestError(f"{source}: {exc}{sep}{fix}") from None
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError, RecursionError) as exc:
            raise ManifestError(f"{source}: malformed entry ({type(exc).__name__}: {_one_line(exc)}); {fix}") from None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200]


def _int(value: Any, what: str, low: int = 0, high: int = MAX_INT64) -> int:
    # Exact ints only: 1e400 (inf), 3.7, "12", true and 10**5000 are all refused, not coerced.
    if type(value) is not int or not low <= value <= high:
        shown = repr(value) if not isinstance(value, (str, int)) or len(str(value)) < 40 else f"{str(value)[:20]}..."
        raise ManifestError(f"{what} {shown} is not an integer in [{low}, {high}]")
    return value


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ManifestError(f"{what} {value!r:.60} is not a string")
    return value


def _safe_relative(path: str) -> str:
    # Plain string checks: this runs once per file of a manifest that may list tens of thousands.
    if not path or path.startswith("/") or "\\" in path or ".." in path.split("/"):
        raise ManifestError(f"file path {path!r:.200} points outside the cache root; a manifest lists relative paths only")
    if "\0" in path:
        raise ManifestError(f"file path {path!r:.200} holds a NUL byte")
    return path


def _file_path(path: str, name: str, shard_id: int, layout: str) -> str:
    """``path`` if it is where ``name`` of shard ``shard_id`` lives in ``layout``; else ``ManifestError``."""
    _safe_relative(path)
    if layout == "native":
        dir_name, _, file_name = path.partition("/")
        d, f = NATIVE_DIR.match(dir_name), NATIVE_FILE.match(file_name)
        ok = d is not None and f is not None and parse_shard_id(d.group(1)) == shard_id and f.group(1) == name
    else:
        m = FLAT_FILE.match(path)
        ok = m is not None and m.group(1) == name and parse_shard_id(m.group(2)) == shard_id
    if not ok:
        raise ManifestError(f"file path {path!r:.200} is not where field {name!r} of {layout} shard {shard_id} lives")
    return path


def _parse_file(f: Any, name: str, shard_id: int, layout: str, spec: FieldSpec, num_samples: int) -> FileEntry:
    if not isinstance(f, dict):
        raise ManifestError(f"shard {shard_id} field {name!r} is not an object")
    path = _file_path(_text(f["path"], "file path"), name, shard_id, layout)
    size = _int(f["bytes"], f"{path}: bytes")
    offset = _int(f["data_offset"], f"{path}: data_offset")
    checksum = f.get("checksum")
    if checksum is not None and not (isinstance(checksum, str) and CHECKSUM.match(checksum)):
        raise ManifestError(f"{path}: checksum {checksum!r:.80} is not {CHECKSUM_ALGORITHM}:<64 hex digits>")
    # The rows must fill the file exactly after its header: a changed data_offset or row count
    # would otherwise read header bytes as data, or rows of another shard.
    if offset < 10 or offset + num_samples * spec.sample_bytes != size:
        raise ManifestError(f"{path}: data_offset {offset:,} + {num_samples:,} rows of {spec.sample_bytes:,} bytes "
                            f"do not make its {size:,} bytes")
    value_range = None
    if "min" in f or "max" in f:
        low = _int(f.get("min"), f"{path}: min", -MAX_INT64 - 1)
        high = _int(f.get("max"), f"{path}: max", -MAX_INT64 - 1)
        if low > high:
            raise ManifestError(f"{path}: min {low} is above max {high}")
        value_range = (low, high)
    return FileEntry(path, size, _int(f["mtime_ns"], f"{path}: mtime_ns", -MAX_INT64), offset, checksum, value_range)


def _parse_field(name: Any, spec: Any) -> FieldSpec:
    if not isinstance(name, str) or not FIELD_NAME.match(name):
        raise ManifestError(f"field name {name!r:.60} is not allowed")
    dtype_text = _text(spec["dtype"], f"field {name!r} dtype")
    if len(dtype_text) > 16:
        raise ManifestError(f"field {name!r} has dtype {dtype_text[:20]!r}..., which is not allowed")
    try:
        dtype = np.dtype(dtype_text)
    except (TypeError, ValueError, OverflowError, MemoryError):
        raise ManifestError(f"field {name!r} has dtype {dtype_text!r}, which is not allowed (not a NumPy dtype)") from None
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None or dtype.itemsize == 0:
        raise ManifestError(f"field {name!r} has dtype {dtype}, which is not allowed (plain numbers only, no objects)")
    shape = spec["shape"]
    if not isinstance(shape, list) or len(shape) > 32:
        raise ManifestError(f"field {name!r} has shape {shape!r:.60}, not a list of sizes")
    dims = tuple(_int(d, f"field {name!r} dimension") for d in shape)
    group = spec.get("group")
    if group is not None and not (isinstance(group, str) and FIELD_NAME.match(group)):
        raise ManifestError(f"field {name!r} has group {group!r:.60}, not a name")
    return FieldSpec(dtype, dims, group)


def _parse(doc: Any) -> Manifest:
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise ManifestError("not a shardstore manifest")
    version = doc.get("version")
    if type(version) is int and version > FORMAT_VERSION:
        raise ManifestError(f"manifest format version {version} is newer than this shardstore reads "
                            f"({FORMAT_VERSION}); upgrade shardstore, or")
    if type(version) is not int or version < 1:
        raise ManifestError(f"manifest format version {version!r:.40} is not a version number")
    fields = {name: _parse_field(name, spec) for name, spec in doc["fields"].items()}
    required = {n for n, f in fields.items() if f.group is None}
    groups: dict[str, set[str]] = {}
    for n, f in fields.items():
        if f.group is not None:
            groups.setdefault(f.group, set()).add(n)
    shards = []
    last_id = -1
    for s in doc["shards"]:
        if not isinstance(s, dict):
            raise ManifestError("a shard entry is not an object")
        shard_id = _int(s["id"], "shard id", 0, MAX_SHARD_ID)
        if shard_id <= last_id:  # ids strictly increase: a shard listed twice would be read twice
            raise ManifestError(f"shard {shard_id} is listed " + ("twice" if shard_id == last_id else "out of id order"))
        last_id = shard_id
        layout = s["layout"]
        if layout not in ("native", "flat"):
            raise ManifestError(f"shard {shard_id} has layout {layout!r:.40}, not 'native' or 'flat'")
        num_samples = _int(s["num_samples"], f"shard {shard_id} num_samples")
        if not isinstance(s["files"], dict):
            raise ManifestError(f"shard {shard_id} files is not an object")
        names = set(s["files"])
        partial = [g for g, members in groups.items() if names & members and not members <= names]
        if not required <= names or not names <= set(fields) or partial:
            raise ManifestError(f"shard {shard_id} lists fields {sorted(map(str, names))}, the manifest {sorted(fields)}"
                                + (f" (group {partial[0]!r} only in part)" if partial else ""))
        files = {name: _parse_file(f, name, shard_id, layout, fields[name], num_samples)
                 for name, f in s["files"].items()}
        shards.append(ShardEntry(shard_id, num_samples, layout, files))
    left_out = []
    for p in doc.get("left_out", []):
        shard_id = p.get("shard_id")
        if shard_id is not None:
            shard_id = _int(shard_id, "left-out shard id", 0, MAX_SHARD_ID)
        left_out.append(Problem(_printable(_text(p["path"], "left-out path")),
                                _printable(_text(p["reason"], "left-out reason")), shard_id))
    return Manifest(fields, shards, left_out)


def _printable(text: str) -> str:
    # A left-out line is printed as is: no control characters (newlines, terminal escapes) from a foreign file.
    return "".join(c if c.isprintable() else "?" for c in text[:1000])


def manifest_path(root: str | Path) -> Path:
    """Where the manifest of the cache at ``root`` lives."""
    return Path(root) / MANIFEST_NAME
