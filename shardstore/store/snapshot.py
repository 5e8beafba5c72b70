"""Reading and writing a manifest snapshot: ``ROOT/manifest.json`` (a small JSON header) and its shard table.

The table is a directory of one ``.npy`` per column, ``ROOT/manifest.d/<snapshot>-<nonce>/``,
named by the header. A build writes the table under a temporary name, fsyncs it, renames it
into place, and only then replaces ``manifest.json`` atomically: a reader that reads the
header finds the table it names complete, so it sees the old snapshot or the new one, never a
header from one build and a table from another. The previous table is kept when a new one is
written (a reader may have read the old header a moment ago); older ones are removed.

Formats 1 and 2 (all JSON) still open; the next build converts them.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from shardstore.errors import ManifestError
from shardstore.store.atomic import disk_full_error, fsync_dir, is_disk_full, pid_alive, write_bytes_atomic
from shardstore.store.layout import MANIFEST_NAME, OutsideRootError, check_within
from shardstore.store.manifest import (
    BASE_COLUMNS,
    CHECKSUM_ALGORITHM,
    DIGEST_BYTES,
    FIELD_COLUMNS,
    FORMAT_NAME,
    FORMAT_VERSION,
    LAYOUTS,
    RANGE_COLUMNS,
    FieldSpec,
    Manifest,
    label_like,
)
from shardstore.store.manifest_json import (
    LEGACY_VERSION,
    checked,
    fields_json,
    left_out_json,
    load_document,
    parse_header,
    parse_legacy,
    rebuild_fix,
)
from shardstore.store.npy import load_array

TABLE_DIR = "manifest.d"
TABLE_NAME = re.compile(r"^[0-9a-f]{16}-[0-9a-f]{8}\Z")
_COLUMN_FILE = re.compile(r"^(id|samples|layout|digits|since"
                          r"|[A-Za-z][A-Za-z0-9_]*\.(offset|mtime_ns|min|max|sha256))\.npy\Z")
_TEMP_TABLE = re.compile(r"^\.([0-9a-f]{16}-[0-9a-f]{8})\.tmp-(\d+)\Z")
LAYOUT_TEMPLATES = {"native": "shard_{id}/{field}.npy", "flat": "{field}_{id}.npy"}
_CHUNK = 1 << 16


def manifest_path(root: str | os.PathLike[str]) -> Path:
    """Where the manifest (header) of the cache at ``root`` lives."""
    return Path(root) / MANIFEST_NAME


def expected_columns(fields: dict[str, FieldSpec], digests: list[str], num_shards: int) -> dict[str, tuple]:
    """Column name to (dtype, shape) that a table of ``fields`` with these checksummed fields must have."""
    out: dict[str, tuple] = {name: (dtype, (num_shards,)) for name, dtype in BASE_COLUMNS.items()}
    for name, spec in fields.items():
        for suffix, dtype in FIELD_COLUMNS.items():
            out[f"{name}.{suffix}"] = (dtype, (num_shards,))
        if label_like(spec):
            for suffix, dtype in RANGE_COLUMNS.items():
                out[f"{name}.{suffix}"] = (dtype, (num_shards,))
    for name in digests:
        out[f"{name}.sha256"] = (np.dtype(np.uint8), (num_shards, DIGEST_BYTES))
    return out


# -- writing ---------------------------------------------------------------------------------


def _write_column(path: Path, array: np.ndarray) -> None:
    with open(path, "xb") as f:
        np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


def _header(manifest: Manifest, table: str) -> dict[str, Any]:
    digests = sorted(n.rsplit(".", 1)[0] for n in manifest.columns if n.endswith(".sha256"))
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "checksum_algorithm": CHECKSUM_ALGORITHM,
        "num_shards": manifest.num_shards,
        "num_samples": manifest.num_samples,
        "total_bytes": manifest.total_bytes,
        "snapshot_id": manifest.snapshot_id,
        "generation": manifest.generation,
        "table": f"{TABLE_DIR}/{table}",
        "layouts": LAYOUT_TEMPLATES,
        "checksummed_fields": digests,
        "columns": {n: {"dtype": c.dtype.str, "shape": list(c.shape)} for n, c in manifest.columns.items()},
        "fields": fields_json(manifest.fields),
        "left_out": left_out_json(manifest.left_out),
    }


def write_manifest(root: str | os.PathLike[str], manifest: Manifest) -> Path:
    """Write ``manifest`` as the cache's new snapshot (table first, then the header, each atomically)."""
    root = Path(root)
    tables = root / TABLE_DIR
    if tables.is_symlink() or (tables.exists() and not tables.is_dir()):
        raise ManifestError(f"{tables} is not a directory of this cache (a link or a file); remove it and rebuild")
    previous = _current_table(root)
    name = f"{manifest.snapshot_id}-{secrets.token_hex(4)}"
    tmp = tables / f".{name}.tmp-{os.getpid()}"
    needed = sum(c.nbytes + 128 for c in manifest.columns.values())
    try:
        tables.mkdir(exist_ok=True)
        remove_stale_tables(tables)
        tmp.mkdir()
        for column, array in manifest.columns.items():
            _write_column(tmp / f"{column}.npy", array)
        fsync_dir(tmp)
        os.rename(tmp, tables / name)
        fsync_dir(tables)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(exc):
            raise disk_full_error(tmp, needed) from None
        raise
    path = manifest_path(root)
    try:
        write_bytes_atomic(path, (json.dumps(_header(manifest, name), indent=1) + "\n").encode())
    except BaseException:
        shutil.rmtree(tables / name, ignore_errors=True)
        raise
    manifest.source = (str(root), name)
    keep = {name, previous}
    for entry in os.scandir(tables):
        if TABLE_NAME.match(entry.name) and entry.name not in keep:
            _remove_table(Path(entry.path))
    return path


def _current_table(root: Path) -> str | None:
    """The table the current header names (None if there is no readable format-3 header)."""
    try:
        doc = json.loads(manifest_path(root).read_text())
        table = doc.get("table", "") if isinstance(doc, dict) else ""
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return None
    name = table[len(TABLE_DIR) + 1:] if isinstance(table, str) and table.startswith(TABLE_DIR + "/") else ""
    return name if TABLE_NAME.match(name) else None


def _remove_table(path: Path) -> None:
    """Remove a table directory this project wrote: its column files, then the directory (never a link).

    Anything else found in it (a user's file) stays, and so does the directory then.
    """
    if path.is_symlink() or not path.is_dir():
        return
    for entry in os.scandir(path):
        if _COLUMN_FILE.match(entry.name) and entry.is_file(follow_symlinks=False):
            try:
                os.unlink(entry.path)
            except OSError:
                pass
    try:
        os.rmdir(path)
    except OSError:
        pass


def remove_stale_tables(tables: Path) -> int:
    """Remove temporary tables of builds whose process is gone; return how many."""
    removed = 0
    for entry in os.scandir(tables):
        m = _TEMP_TABLE.match(entry.name)
        if m and not pid_alive(int(m.group(2))):
            _remove_table(Path(entry.path))
            removed += 1
    return removed


# -- reading ---------------------------------------------------------------------------------


def read_manifest(root: str | os.PathLike[str], *, check: str = "open") -> Manifest:
    """Read and validate the manifest of the cache at ``root`` (any format); ``ManifestError`` with the fix.

    ``check="open"`` validates what costs O(1) Python objects and a pass over the id and count
    columns; ``check="all"`` validates every column (``shardstore verify`` does, and
    ``ShardStore.open(check="all")``).
    """
    root = Path(root)
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is not a directory"
        raise ManifestError(f"{root} {what}; pass the cache directory that holds manifest.json")
    path = manifest_path(root)
    previous_text = None
    for _ in range(3):
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise ManifestError(f"{path} does not exist; run `shardstore build-manifest {root}` first") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ManifestError(f"{path}: cannot be read ({exc}); "
                                f"rebuild it with `shardstore build-manifest {root}`") from None
        doc = load_document(text, str(path))
        version = doc.get("version") if isinstance(doc, dict) else None
        if type(version) is int and 1 <= version <= LEGACY_VERSION:
            return checked(str(path), parse_legacy, doc)
        try:
            return checked(str(path), _parse_snapshot, root, doc, check)
        except _TableReplaced:
            if text == previous_text:  # the same header twice: its table is gone, not being replaced
                raise ManifestError(f"{path}: the table it names ({doc.get('table')!r:.80}) is missing; "
                                    f"rebuild it with `shardstore build-manifest {root}`") from None
            previous_text = text
    raise ManifestError(f"{path}: its table keeps being replaced while it is read; "
                        "wait for the running `shardstore build-manifest` to finish")


def parse_snapshot_text(doc: Any, source: str) -> Manifest:
    """A format-3 header document read from ``source`` (its path: the table lies beside it)."""
    if not source.endswith(MANIFEST_NAME) or not os.path.dirname(source):
        raise ManifestError(f"{source}: a format-3 manifest is read together with its table; "
                            "use shardstore.store.reader.load_manifest(ROOT)")
    try:
        return checked(source, _parse_snapshot, Path(source).parent, doc, "open")
    except _TableReplaced:
        raise ManifestError(f"{source}: the table it names is missing; {rebuild_fix(source)}") from None


class _TableReplaced(Exception):
    """The table a header named is gone: a build replaced both since the header was read."""


def _parse_snapshot(root: Path, doc: Any, check: str) -> Manifest:
    version, fields, left_out = parse_header(doc)
    if not fields:
        raise ManifestError("lists no fields")
    num_shards = doc["num_shards"]
    num_samples = doc["num_samples"]
    generation = doc.get("generation", 0)
    for what, value in (("num_shards", num_shards), ("num_samples", num_samples), ("generation", generation)):
        if type(value) is not int or not 0 <= value < 2**63:
            raise ManifestError(f"{what} {value!r:.40} is not a count")
    snapshot_id = doc["snapshot_id"]
    if not isinstance(snapshot_id, str) or not re.match(r"^[0-9a-f]{16}\Z", snapshot_id):
        raise ManifestError(f"snapshot_id {snapshot_id!r:.40} is not 16 hex digits")
    table = doc["table"]
    name = table[len(TABLE_DIR) + 1:] if isinstance(table, str) and table.startswith(TABLE_DIR + "/") else ""
    if not TABLE_NAME.match(name):
        raise ManifestError(f"table {table!r:.80} is not a {TABLE_DIR}/<snapshot> directory of this cache")
    digests = doc.get("checksummed_fields", [])
    if not isinstance(digests, list) or not set(digests) <= set(fields):
        raise ManifestError(f"checksummed_fields {digests!r:.80} names fields the manifest does not have")
    directory = root / TABLE_DIR / name
    try:
        check_within(os.path.realpath(root), directory, f"{TABLE_DIR}/{name}")
    except OutsideRootError as exc:
        raise ManifestError(str(exc)) from None
    columns = {}
    for column, (dtype, shape) in expected_columns(fields, digests, num_shards).items():
        columns[column] = _load_column(directory / f"{column}.npy", dtype, shape)
    manifest = Manifest(fields, columns=columns, left_out=left_out, generation=generation,
                        snapshot_id=snapshot_id, source=(str(root), name))
    manifest.format_version = version
    check_columns(manifest, num_samples, full=check == "all")
    return manifest


def _load_column(path: Path, dtype: np.dtype, shape: tuple) -> np.ndarray:
    if path.is_symlink():  # the table directory is checked to be inside the root; its files must be its own
        raise ManifestError(f"{path.parent.name}/{path.name} is a symbolic link (it may lead outside the cache root); "
                            "a table holds only its own files")
    try:
        if shape[0] == 0:
            array = load_array(path)
        else:
            array = load_array(path, mmap=True)
    except FileNotFoundError:
        if not path.parent.exists():
            raise _TableReplaced() from None
        raise ManifestError(f"its table lacks {path.name}") from None
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise _TableReplaced() from None
        raise ManifestError(f"{path.name} cannot be read ({exc.strerror or exc})") from None
    except ValueError:
        raise ManifestError(f"{path.parent.name}/{path.name} is not a plain .npy array of numbers (objects and "
                            "pickled data are never loaded)") from None
    if array.dtype != dtype or array.shape != shape:
        raise ManifestError(f"{path.name} holds {array.dtype}{list(array.shape)}, the header promises "
                            f"{dtype}{list(shape)} (a table from another build?)")
    return array


def _chunks(n: int) -> range:
    return range(0, n, _CHUNK)


def check_columns(manifest: Manifest, num_samples: int | None = None, *, full: bool = False) -> None:
    """Validate the table: ids strictly increase, counts are non-negative (and add up); with ``full`` every column.

    Works in chunks, so checking a million rows touches the columns once and allocates little.
    """
    c = manifest.columns
    n = manifest.num_shards
    ids, counts = c["id"], c["samples"]
    total = 0
    previous = -1
    for start in _chunks(n):
        block = np.asarray(ids[start:start + _CHUNK])
        if block[0] <= previous or (block.size > 1 and not bool((block[1:] > block[:-1]).all())):
            bad = start + int(np.flatnonzero(np.diff(np.concatenate([[previous], block])) <= 0)[0])
            raise ManifestError(f"shard id {int(ids[bad])} at row {bad} is listed twice or out of id order")
        previous = int(block[-1])
        part = np.asarray(counts[start:start + _CHUNK])
        if part.size and int(part.min()) < 0:
            raise ManifestError(f"a shard has a negative sample count ({int(part.min())})")
        total += int(part.sum())
    if num_samples is not None and total != num_samples:
        raise ManifestError(f"the table's shards hold {total:,} samples, the header says {num_samples:,}")
    manifest._num_samples = total
    if n and int(ids[0]) < 0:
        raise ManifestError(f"shard id {int(ids[0])} is negative")
    for start in _chunks(n):  # one byte each: cheap enough for every open
        layout, digits = np.asarray(c["layout"][start:start + _CHUNK]), np.asarray(c["digits"][start:start + _CHUNK])
        if int(layout.max()) >= len(LAYOUTS) or not 1 <= int(digits.min()) <= int(digits.max()) <= 20:
            raise ManifestError("a shard's layout or id width is out of range")
    if not full:
        return
    groups: dict[str, list[str]] = {}
    for name, spec in manifest.fields.items():
        offsets = np.asarray(c[f"{name}.offset"])
        present = offsets != 0
        if spec.group is None and not bool(present.all()):
            raise ManifestError(f"shard {int(ids[np.flatnonzero(~present)[0]])} lacks field {name!r}, which every "
                                "shard must have")
        if bool((present & (offsets < 10)).any()):
            raise ManifestError(f"field {name!r}: a data offset is inside the .npy magic")
        if spec.group is not None:
            groups.setdefault(spec.group, []).append(name)
        if f"{name}.min" in c:
            low, high = np.asarray(c[f"{name}.min"]), np.asarray(c[f"{name}.max"])
            if bool((~present & (low <= high)).any()):
                raise ManifestError(f"field {name!r}: a value range for a file the shard lacks")
    for group, names in groups.items():
        have = np.stack([manifest.has(n) for n in names])
        if bool((have.any(axis=0) & ~have.all(axis=0)).any()):
            raise ManifestError(f"group {group!r} is only in part in a shard")
