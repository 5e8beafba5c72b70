"""Manifest JSON: the header of format 3, and the whole of formats 1 and 2 (still read, converted by the next build).

Everything here may come from someone else: every number must be an exact integer in range,
every name a field name, every path one of the two layouts inside the root; anything else is
one line naming the file and the fix, never a crash.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import numpy as np

from shardstore.errors import ManifestError
from shardstore.store.layout import (
    FIELD_NAME,
    FLAT_FILE,
    MANIFEST_NAME,
    MAX_SHARD_ID,
    NATIVE_DIR,
    NATIVE_FILE,
    parse_shard_id,
)
from shardstore.store.manifest import (
    CHECKSUM_ALGORITHM,
    FORMAT_NAME,
    FORMAT_VERSION,
    FieldSpec,
    FileEntry,
    Manifest,
    Problem,
    ShardEntry,
)

CHECKSUM = re.compile(rf"^{CHECKSUM_ALGORITHM}:[0-9a-f]{{64}}$")
MAX_INT64 = 2**63 - 1
LEGACY_VERSION = 2  # the last all-JSON format


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
        raise ManifestError(f"file path {path!r:.200} points outside the cache root; "
                            "a manifest lists relative paths only")
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
    if offset >= 2**32:
        raise ManifestError(f"{path}: data_offset {offset:,} is beyond any .npy header")
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
        raise ManifestError(f"field {name!r} has dtype {dtype_text!r}, "
                            "which is not allowed (not a NumPy dtype)") from None
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


def parse_header(doc: Any) -> tuple[int, dict[str, FieldSpec], list[Problem]]:
    """The format version, fields and left-out list of a manifest document of any version."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise ManifestError("not a shardstore manifest")
    version = doc.get("version")
    if type(version) is int and version > FORMAT_VERSION:
        raise ManifestError(f"manifest format version {version} is newer than this shardstore reads "
                            f"({FORMAT_VERSION}); upgrade shardstore, or")
    if type(version) is not int or version < 1:
        raise ManifestError(f"manifest format version {version!r:.40} is not a version number")
    if not isinstance(doc["fields"], dict):
        raise ManifestError("fields is not an object")
    fields = {name: _parse_field(name, spec) for name, spec in doc["fields"].items()}
    left_out = []
    for p in doc.get("left_out", []):
        shard_id = p.get("shard_id")
        if shard_id is not None:
            shard_id = _int(shard_id, "left-out shard id", 0, MAX_SHARD_ID)
        left_out.append(Problem(_printable(_text(p["path"], "left-out path")),
                                _printable(_text(p["reason"], "left-out reason")), shard_id))
    return version, fields, left_out


def _digits(path: str, layout: str) -> int:
    name = path.partition("/")[0] if layout == "native" else path[: -len(".npy")]
    return len(name.rsplit("_", 1)[1])


def parse_legacy(doc: Any) -> Manifest:
    """A format 1 or 2 manifest (all JSON, a dict per shard), validated, as a columnar ``Manifest``."""
    version, fields, left_out = parse_header(doc)
    if version > LEGACY_VERSION:
        raise ManifestError(f"manifest format version {version} keeps its shards in a table, not in JSON")
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
            raise ManifestError(f"shard {shard_id} is listed "
                                + ("twice" if shard_id == last_id else "out of id order"))
        last_id = shard_id
        layout = s["layout"]
        if layout not in ("native", "flat"):
            raise ManifestError(f"shard {shard_id} has layout {layout!r:.40}, not 'native' or 'flat'")
        num_samples = _int(s["num_samples"], f"shard {shard_id} num_samples")
        if not isinstance(s["files"], dict):
            raise ManifestError(f"shard {shard_id} files is not an object")
        names = set(s["files"])
        partial = [g for g, members in groups.items() if names & members and not members <= names]
        if not required <= names or not names <= set(fields) or partial or not names:
            raise ManifestError(f"shard {shard_id} lists fields {sorted(map(str, names))}, "
                                f"the manifest {sorted(fields)}"
                                + (f" (group {partial[0]!r} only in part)" if partial else ""))
        files = {name: _parse_file(f, name, shard_id, layout, fields[name], num_samples)
                 for name, f in s["files"].items()}
        digits = {_digits(f.path, layout) for f in files.values()}
        if len(digits) > 1:
            raise ManifestError(f"shard {shard_id} names its files with ids of different widths")
        shards.append(ShardEntry(shard_id, num_samples, layout, files, digits.pop()))
    manifest = Manifest(fields, shards, left_out)
    manifest.format_version = version
    return manifest


def to_legacy_json(manifest: Manifest) -> str:
    """``manifest`` as a format-2 document (what older versions wrote), for tests and downgrades."""
    doc = {
        "format": FORMAT_NAME,
        "version": LEGACY_VERSION,
        "checksum_algorithm": CHECKSUM_ALGORITHM,
        "num_shards": manifest.num_shards,
        "num_samples": manifest.num_samples,
        "total_bytes": manifest.total_bytes,
        "fields": fields_json(manifest.fields),
        "shards": [
            {"id": s.id, "num_samples": s.num_samples, "layout": s.layout,
             "files": {n: {"path": f.path, "bytes": f.bytes, "mtime_ns": f.mtime_ns, "data_offset": f.data_offset,
                           "checksum": f.checksum,
                           **({"min": f.value_range[0], "max": f.value_range[1]} if f.value_range else {})}
                       for n, f in s.files.items()}}
            for s in manifest.shards
        ],
        "left_out": left_out_json(manifest.left_out),
    }
    return json.dumps(doc, indent=1) + "\n"


def fields_json(fields: dict[str, FieldSpec]) -> dict:
    return {n: {"dtype": f.dtype.str, "shape": list(f.shape), **({"group": f.group} if f.group else {})}
            for n, f in fields.items()}


def left_out_json(left_out: list[Problem]) -> list[dict]:
    return [{"shard_id": p.shard_id, "path": p.path, "reason": p.reason} for p in left_out]


def load_document(text: str, source: str) -> Any:
    """The JSON document of a manifest; ``ManifestError`` naming ``source`` when it is not JSON."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ManifestError(f"{source}: nested too deeply to be a manifest; {rebuild_fix(source)}") from None
    except ValueError as exc:  # JSONDecodeError, or an integer of thousands of digits
        raise ManifestError(f"{source}: not valid JSON ({_one_line(exc)}); {rebuild_fix(source)}") from None


def rebuild_fix(source: str) -> str:
    root = os.path.dirname(source) if source.endswith(MANIFEST_NAME) else ""
    return f"rebuild it with `shardstore build-manifest{' ' + root if root else ''}`"


def checked(source: str, parse: Any, *args: Any) -> Any:
    """``parse(*args)`` with any defect of a foreign document turned into one line naming ``source``."""
    fix = rebuild_fix(source)
    try:
        return parse(*args)
    except ManifestError as exc:
        sep = " " if str(exc).endswith(", or") else "; "
        raise ManifestError(f"{source}: {exc}{sep}{fix}") from None
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError, RecursionError) as exc:
        raise ManifestError(f"{source}: malformed entry ({type(exc).__name__}: {_one_line(exc)}); {fix}") from None


def _printable(text: str) -> str:
    # A left-out line is printed as is: no control characters (newlines, terminal escapes) from a foreign file.
    return "".join(c if c.isprintable() else "?" for c in text[:1000])


