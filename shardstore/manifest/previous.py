"""What a build takes from the existing manifest: its table (to trust, or only to lend from), each shard's ``since``.

A format-3 table that passes ``check_columns(full=True)`` is the base of an incremental build
(see ``build_manifest``). Any other manifest only *lends*: a file read again whose size and
mtime are the recorded ones keeps its recorded checksum. Formats 1 and 2 lend (their next
build reads every header and writes format 3), and so does a manifest that fails validation,
as far as its well-formed entries go: a recorded checksum can only make ``verify`` stricter,
and dropping them all because one value was edited would let any change through unnoticed.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shardstore.errors import ManifestError
from shardstore.manifest.scan import Lender, Lent, one_line
from shardstore.store.layout import open_within
from shardstore.store.manifest import (
    LAYOUTS,
    FieldSpec,
    FileEntry,
    Manifest,
    digest_text,
    shard_file_path,
)
from shardstore.store.manifest_json import CHECKSUM, parse_header
from shardstore.store.npy import load_array
from shardstore.store.snapshot import (
    TABLE_DIR,
    TABLE_NAME,
    check_columns,
    manifest_path,
    read_manifest,
)

log = logging.getLogger(__name__)


@dataclass
class Previous:
    """The existing manifest as a build sees it."""

    #: the validated manifest (None: there is none, or it was refused)
    manifest: Manifest | None = None
    #: a format-3 table that passed the full column check: an incremental build trusts its unchanged rows
    trusted: bool = False
    #: what a file read again keeps from it (None: nothing)
    lend: Lender | None = None

    @property
    def generation(self) -> int:
        return self.manifest.generation if self.manifest is not None else -1

    def since(self, shard_ids: np.ndarray, default: int) -> np.ndarray:
        """The ``since`` of each id in the previous table, ``default`` for ids it lacks (uint32)."""
        out = np.full(len(shard_ids), default, np.uint32)
        m = self.manifest
        if m is None or not m.num_shards or not len(shard_ids):
            return out
        old = np.asarray(m.ids)
        at = np.minimum(np.searchsorted(old, shard_ids), old.size - 1)
        hit = old[at] == shard_ids
        out[hit] = np.asarray(m.columns["since"])[at[hit]]
        return out


def table_lender(m: Manifest) -> Lender:
    """What ``m`` recorded for a file, looked up by shard id (the table's rows are in id order)."""
    ids = np.asarray(m.ids)

    def lend(rel: str, shard_id: int, field: str) -> Lent | None:
        p = int(np.searchsorted(ids, shard_id))
        if p >= ids.size or int(ids[p]) != shard_id or field not in m.fields or m.file_path(p, field) != rel:
            return None
        checksum = m.checksum(p, field)
        if not m.columns[f"{field}.offset"][p]:  # not listed, yet a checksum may be: hashed to compare
            return None if checksum is None else Lent(None, 0, checksum)
        return Lent(m.file_bytes(p, field), int(m.columns[f"{field}.mtime_ns"][p]), checksum)

    return lend


def dict_lender(files: dict[str, FileEntry], *, strict: bool = True) -> Lender | None:
    if not files:
        return None

    def lend(rel: str, shard_id: int, field: str) -> Lent | None:
        f = files.get(rel)
        return None if f is None else Lent(f.bytes, f.mtime_ns, f.checksum, strict)

    return lend


def previous_manifest(root: Path) -> Previous:
    """The existing manifest of ``root``: trusted (format 3, every column valid), lending only, or none."""
    path = manifest_path(root)
    if not path.exists():
        return Previous()
    try:
        old = read_manifest(root)
    except ManifestError as exc:
        salvaged, strict = salvage(root)
        log.warning("ignoring the existing manifest (every header is read again; %d recorded checksums kept): %s",
                    sum(f.checksum is not None for f in salvaged.values()), one_line(exc))
        return Previous(lend=dict_lender(salvaged, strict=strict))
    if old.format_version < 3:
        return Previous(old, False, table_lender(old))
    try:
        check_columns(old, full=True)
    except ManifestError as exc:
        log.warning("the existing manifest's table fails its check (%s); every header is read again, its recorded "
                    "checksums kept", one_line(exc))
        return Previous(old, False, table_lender(old))
    return Previous(old, True, table_lender(old))


def salvage(root: Path) -> tuple[dict[str, FileEntry], bool]:
    """Well-formed (path, bytes, mtime, checksum) entries of a refused manifest; the first of a path wins.

    Also whether they are strict (see ``Lent``): a format 1/2 entry names its own path; a refused
    table's row is placed by an id column that may be what was refused.
    """
    try:
        text = manifest_path(root).read_text()
        doc = json.loads(text)
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return {}, True
    if isinstance(doc, dict) and "table" in doc:
        return _salvage_table(root, doc), False
    out: dict[str, FileEntry] = {}
    try:
        for shard in doc["shards"]:
            for f in shard["files"].values():
                rel, size, mtime, digest = f["path"], f["bytes"], f["mtime_ns"], f.get("checksum")
                if (isinstance(rel, str) and type(size) is int and type(mtime) is int and isinstance(digest, str)
                        and CHECKSUM.match(digest) and rel not in out):
                    out[rel] = FileEntry(rel, size, mtime, 0, digest)
    except Exception:  # noqa: BLE001 - whatever else it holds, the entries found so far are kept
        pass
    return out, True


def _column(resolved_root: str, directory: Path, name: str) -> np.ndarray:
    fd = open_within(resolved_root, directory / f"{name}.npy", f"{TABLE_DIR}/{directory.name}/{name}.npy")
    with os.fdopen(fd, "rb") as f:
        return load_array(f)


def _salvage_table(root: Path, doc: dict) -> dict[str, FileEntry]:
    """The checksummed files of a format-3 table that was refused, as far as its columns can still be read."""
    out: dict[str, FileEntry] = {}
    try:
        _, fields, _ = parse_header(doc)
        table = doc["table"]
        name = table[len(TABLE_DIR) + 1:] if isinstance(table, str) and table.startswith(TABLE_DIR + "/") else ""
        digests = doc.get("checksummed_fields", [])
        if not TABLE_NAME.match(name) or not isinstance(digests, list):
            return out
        directory = root / TABLE_DIR / name
        resolved = os.path.realpath(root)
        base = {c: _column(resolved, directory, c) for c in ("id", "samples", "layout", "digits")}
        n = len(base["id"])
        for field in digests:
            spec = fields.get(field) if isinstance(field, str) else None
            if spec is None:
                continue
            cols = {s: _column(resolved, directory, f"{field}.{s}") for s in ("offset", "mtime_ns", "sha256")}
            _salvage_field(out, field, spec, base, cols, n)
    except Exception:  # noqa: BLE001 - a refused table may hold anything; what was read so far is kept
        pass
    return out


def _salvage_field(out: dict[str, FileEntry], field: str, spec: FieldSpec, base: dict[str, np.ndarray],
                   cols: dict[str, np.ndarray], n: int) -> None:
    for p in range(n):
        layout, digits, offset = int(base["layout"][p]), int(base["digits"][p]), int(cols["offset"][p])
        if (not 0 <= layout < len(LAYOUTS) or not 1 <= digits <= 20 or offset <= 0 or int(base["id"][p]) < 0
                or int(base["samples"][p]) < 0):  # no size to compare the file with
            continue
        checksum = digest_text(cols["sha256"][p])
        if checksum is None:
            continue
        rel = shard_file_path(LAYOUTS[layout], int(base["id"][p]), digits, field)
        if rel not in out:
            size = offset + int(base["samples"][p]) * spec.sample_bytes
            out[rel] = FileEntry(rel, size, int(cols["mtime_ns"][p]), offset, checksum)
