"""Which rows of the previous table still describe their files: the root's listing and a ``stat`` per file, vectorized.

The names a table implies (``shard_<id>`` directories, ``<field>_<id>.npy`` files) and the
size each file must have (``offset + samples * sample_bytes``) are built from its columns with
NumPy string and integer operations, never one Python object per shard. The ``stat`` of each
file (``lstat`` relative to the open root) is made by ``kernels.read_heads`` in one compiled
loop: in a Python loop, 3x10^5 of them cost 0.7 s on the 2-core VM, most of an unchanged
build's budget; in C, about a sixth of that.

A row is kept when every file it lists has the size and mtime it records and is a regular
file, no file of a declared group appeared in its directory, its directory is not a link and
no name in it was added, removed or renamed since its newest file (its mtime is no later than
the newest ctime of its files: one more ``stat`` per native shard, 0.25 s per 10^5 here), and
no new name in the root carries its id. Everything else is read again.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from shardstore.kernels import Heads, read_heads
from shardstore.store.layout import FLAT_FILE, NATIVE_DIR, parse_shard_id
from shardstore.store.manifest import LAYOUTS, FieldSpec, Manifest

_NATIVE = LAYOUTS.index("native")
_strings = getattr(np, "strings", None)  # NumPy >= 2: vectorized zfill with a width per element


@dataclass
class Changes:
    """What a listing and a ``stat`` per file say about the previous table."""

    #: per row of the previous table: every file as recorded, nothing added (the row is copied)
    keep: np.ndarray
    #: the root entries to discover and read: new names, and the names of rows not kept
    entries: list[os.DirEntry] = field(default_factory=list)
    #: files and shard directories ``stat``-ed
    stats: int = 0


def id_text(ids: np.ndarray, digits: np.ndarray) -> np.ndarray:
    """Each id as it appears in its names (str, zero-filled to its digits)."""
    text = np.asarray(ids, np.int64).astype(np.str_)
    widths = np.asarray(digits, np.int64)
    if _strings is not None:
        return _strings.zfill(text, widths)
    out = np.empty(len(text), f"U{max(21, int(widths.max(initial=0)))}")
    for width in np.unique(widths):
        sel = widths == width
        out[sel] = np.char.zfill(text[sel], int(width))
    return out


#: paths ``lstat``-ed by one thread; more are split between two (the compiled loop holds no GIL)
STAT_SPLIT = 32768


def _stat_files(root_fd: int, paths: list[bytes], kind: int = 0o100000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Size (-1: missing, not of ``kind`` (a regular file), or unreadable), mtime_ns and ctime_ns of each path.

    One ``lstat`` each, relative to the open root, in the compiled loop; a long list in two
    halves on two threads.
    """
    if len(paths) > STAT_SPLIT:
        half = len(paths) // 2
        with ThreadPoolExecutor(1, thread_name_prefix="shardstore-stat") as pool:
            second = pool.submit(read_heads, root_fd, paths[half:], 0)
            first = read_heads(root_fd, paths[:half], 0)
            stats = np.concatenate([first.stats, second.result().stats])
        st = Heads(stats, np.zeros((len(paths), 0), np.uint8))
    else:
        st = read_heads(root_fd, paths, 0)
    # gone, its directory gone or replaced by a file, unreadable, or of another kind: read again
    there = (st.errno == 0) & (st.mode & 0o170000 == kind)
    return np.where(there, st.size, -1), np.where(there, st.mtime_ns, 0), np.where(there, st.ctime_ns, 0)


def find_changes(root_fd: int, base: Manifest, groups: dict[str, FieldSpec], entries: list[os.DirEntry]) -> Changes:
    """Compare ``base`` (a table that passed the full column check) with the root's ``entries`` and its files.

    ``groups`` are the declared groups' fields: in a native directory their files are looked
    for whether the row lists them or not (a group is often added to finished shards).
    """
    c = base.columns
    n = base.num_shards
    ids = np.asarray(c["id"], np.int64)
    samples = np.asarray(c["samples"], np.int64)
    native = np.asarray(c["layout"]) == _NATIVE
    text = id_text(ids, np.asarray(c["digits"]))
    dirs = np.char.add("shard_", text[native])
    dirs_b = dirs.astype(np.bytes_)
    changed = np.zeros(n, bool)
    expected = [dirs]
    names = {**base.fields, **groups}
    # A directory's mtime moves when a name in it is added, removed or renamed, and no earlier than the
    # ctime of the file that did it: a directory younger than every file in it gained or lost a name.
    native_rows = np.flatnonzero(native)
    dir_size, dir_mtime, _ = _stat_files(root_fd, dirs_b.tolist(), kind=0o040000)
    newest = np.full(len(native_rows), np.iinfo(np.int64).min, np.int64)
    stats = len(native_rows)
    changed[native_rows[dir_size < 0]] = True
    for name, spec in names.items():
        if name in base.fields:
            offsets = np.asarray(c[f"{name}.offset"], np.int64)
            mtimes = np.asarray(c[f"{name}.mtime_ns"], np.int64)
        else:  # a group declared since: no row lists it yet
            offsets = np.zeros(n, np.int64)
            mtimes = offsets
        present = offsets != 0
        flat_rows = np.flatnonzero(~native & present)
        flat_names = np.char.add(np.char.add(f"{name}_", text[flat_rows]), ".npy")
        expected.append(flat_names)
        # Native rows: the file whether listed or not (a group file may have appeared); flat rows: listed files
        # (a new flat file is a new name in the listing).
        rows = np.concatenate([np.flatnonzero(native), flat_rows])
        paths = np.concatenate([np.char.add(dirs_b, f"/{name}.npy".encode()), flat_names.astype(np.bytes_)])
        size, mtime, ctime = _stat_files(root_fd, paths.tolist())
        stats += len(rows)
        want = offsets[rows] + samples[rows] * spec.sample_bytes
        there = size >= 0
        differs = (there != present[rows]) | (present[rows] & ((size != want) | (mtime != mtimes[rows])))
        changed[rows[differs]] = True
        newest = np.maximum(newest, np.where(there[:len(native_rows)], ctime[:len(native_rows)], newest))
    changed[native_rows[dir_mtime > newest]] = True
    expected_names = set(np.concatenate(expected).tolist()) if n else set()
    by_id: dict[int | None, list[os.DirEntry]] = {}  # new names (and links where a row's name was) by their id
    for entry in entries:
        if entry.name in expected_names and not entry.is_symlink():
            continue
        m = NATIVE_DIR.match(entry.name) or FLAT_FILE.match(entry.name)
        if m is not None:  # an id too large for int64 (None) is named by discovery
            by_id.setdefault(parse_shard_id(m.group(m.lastindex or 1)), []).append(entry)
    new_ids = np.fromiter((i for i in by_id if i is not None), np.int64)
    at = np.searchsorted(ids, new_ids)
    inside = at < n
    at, new_ids = at[inside], new_ids[inside]
    changed[at[ids[at] == new_ids]] = True  # a new name with the id of a row: the row is read with it
    picked = [e for group in by_id.values() for e in group]
    if changed.any():
        names_of_changed = set(np.concatenate([
            np.char.add("shard_", text[changed & native]),
            *(np.char.add(np.char.add(f"{f}_", text[changed & ~native]), ".npy") for f in base.fields),
        ]).tolist())
        # (names the table does not imply, and links, were picked above)
        picked += [e for e in entries if e.name in names_of_changed and e.name in expected_names and not e.is_symlink()]
    return Changes(~changed, picked, stats)
