"""Finding shards under a cache root in the native and the flat layout, by name (no file is read).

A root of 10^5 shard directories is discovered in a few operations per name: the shard ids
that one directory alone names (nearly all of them) need no bookkeeping of conflicts, the
directories a writers' journal vouches for are ``lstat``-ed in one compiled loop, and a
directory found whole keeps its field names (shared with its neighbours) rather than a dict
of paths. Every other name -- flat files, links, ids named twice, ids too large -- goes through
the careful per-name loop, in name order.
"""

from __future__ import annotations

import operator
import os
import re
import stat
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future
from itertools import compress, repeat
from operator import attrgetter
from pathlib import Path

import numpy as np

from shardstore.kernels import Heads, read_heads
from shardstore.manifest.journal import Journal
from shardstore.manifest.model import Problem
from shardstore.store.layout import (
    FLAT_FILE,
    NATIVE_DIR,
    NATIVE_FILE,
    OutsideRootError,
    check_within,
    parse_shard_id,
)

LEFT_OUT = "the shard is left out"


class Candidate:
    """A shard found by name: its id, layout, where it is, and its field files (paths relative to the root).

    A native shard found whole may carry only its sorted field ``names`` (shared by the shards
    of one writer); its ``files`` are then ``<where>/<name>.npy``, made when first asked for.
    """

    __slots__ = ("_files", "id", "layout", "names", "where")

    def __init__(self, id: int, layout: str, where: str, files: dict[str, str] | None = None,
                 names: tuple[str, ...] | None = None) -> None:
        self.id = id
        self.layout = layout
        self.where = where  # the shard directory, or the first flat file seen
        #: sorted field names of a native shard whose files are ``<where>/<name>.npy`` (None: see ``files``)
        self.names = names
        self._files = files if files is not None or names is not None else {}

    @property
    def files(self) -> dict[str, str]:
        """Field name -> path of its file, relative to the root."""
        if self._files is None:
            where = self.where
            self._files = {n: f"{where}/{n}.npy" for n in self.names}  # type: ignore[union-attr]
        return self._files

    def __repr__(self) -> str:
        return f"Candidate({self.id}, {self.layout!r}, {self.where!r}, {self.files!r})"


def list_root(root: Path) -> list[os.DirEntry]:
    """The entries of the cache root, unsorted (one ``scandir``: names, types and inodes at no extra cost)."""
    with os.scandir(root) as entries:
        return list(entries)


def _escape(resolved_root: str, entry: os.DirEntry, rel: str) -> OutsideRootError | None:
    # Only symlinks can lead out of the root, and scandir knows which entries are links at no cost.
    if not entry.is_symlink():
        return None
    try:
        check_within(resolved_root, entry.path, rel)
    except OutsideRootError as exc:
        return exc
    return None


def _native_files(resolved_root: str, dir_path: str, dir_name: str) -> tuple[dict[str, str], OutsideRootError | None]:
    files = {}
    with os.scandir(dir_path) as inner:
        for f in inner:
            m = NATIVE_FILE.match(f.name)
            # (a name that matches is never a temporary one: no leading dot, no ".tmp", it ends in ".npy")
            if m and f.is_file():
                rel = f"{dir_name}/{f.name}"
                escape = _escape(resolved_root, f, rel)
                if escape is not None:
                    return {}, escape
                files[m.group(1)] = rel
    return files, None


def _bad_id(name: str, digits: str) -> Problem:
    return Problem(name, f"shard id {digits[:24]}{'...' if len(digits) > 24 else ''} is larger than {2**63 - 1:,} "
                         f"(ids are 64-bit); rename it with a smaller id; {LEFT_OUT}")


#: per line of names joined by newlines, the digits of a native shard directory's name (NATIVE_DIR), or ""
_NATIVE_LINES = re.compile(r"^(?:shard_(\d+)$)?.*$", re.MULTILINE)


#: shard directories found whole handed on at a time (see ``discover_shards``' ``whole``): large enough that the
#: reading thread seldom waits for the GIL between batches (measured: 2,048 cost 5-10% more at 10^5 shards)
WHOLE_BATCH = 8192


def discover_shards(root: Path, entries: list[os.DirEntry] | None = None, *, journal: Journal | None = None,
                    root_fd: int | None = None, whole: Callable[[list[Candidate]], None] | None = None,
                    pool: Executor | None = None) -> tuple[dict[int, Candidate], list[Problem]]:
    """Return the shards under ``root`` by id (sorted), and the names that cannot be used as a shard.

    ``entries`` limits discovery to those entries of the root (all of them by default). With
    ``journal``, a native directory the journal vouches for (same inode and mtime) is not
    listed: its files are the journal's. ``root_fd``: ``root`` open as a directory, if the
    caller holds one. ``whole`` is given the shard directories that no other name can
    conflict with (a plain directory, the only name of its id) a batch at a time as soon as
    they are found, while the rest of the root is still being looked at: a build starts
    reading them meanwhile. ``pool`` (one thread) ``lstat``-s the next batch of directories
    for the journal while this one is checked.
    Temporary names of unfinished writers (hidden, ``.tmp``) are skipped silently. A shard
    directory or file that is a symlink to somewhere outside the root is left out (and never
    read): a cache only ever serves what lies inside it.
    """
    resolved_root = os.path.realpath(root)
    if entries is None:
        entries = list_root(root)
    plain_ids, plain_dirs, others = _plain_directories(entries)
    shards: dict[int, Candidate] = {}
    problems: list[Problem] = []
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC) if root_fd is None else root_fd
    try:
        for batch in _found_whole(fd, resolved_root, plain_ids, plain_dirs, journal, pool, problems):
            shards.update(zip(map(attrgetter("id"), batch), batch))
            if whole is not None:
                whole(batch)
    finally:
        if root_fd is None:
            os.close(fd)
    found, more = _careful(resolved_root, others, journal)
    problems += more
    for shard_id, cand in found.items():
        if not cand.files:
            problems.append(Problem(cand.where, "shard directory holds no <field>.npy files", shard_id))
            continue
        shards[shard_id] = cand
    if found:
        shards = dict(sorted(shards.items()))
    return shards, problems


def _plain_directories(entries: list[os.DirEntry]) -> tuple[list[int], list[os.DirEntry], list[os.DirEntry]]:
    """The plain shard directories by id (not links; their id named by nothing else), and every other shard name.

    One regex pass over all names. A name that matches either pattern is never a temporary
    one (no leading dot, no ".tmp", ends in a digit or ".npy"), so temporaries fall through.
    """
    names = [e.name for e in entries]
    text = "\n".join(names)
    if names and text.count("\n") == len(names) - 1:  # none holds a newline: one line per name
        digits = _NATIVE_LINES.findall(text)
    else:
        digits = [m.group(1) if (m := NATIVE_DIR.match(n)) is not None else "" for n in names]
    at = list(compress(range(len(digits)), digits))
    is_dir = list(map(os.DirEntry.is_dir, map(entries.__getitem__, at)))  # (a link to a directory too)
    if not all(is_dir):
        at = list(compress(at, is_dir))
    dirs = list(map(entries.__getitem__, at))
    native_digits = list(map(digits.__getitem__, at))
    if max(map(len, native_digits), default=0) <= 18:  # (int() of up to 18 digits always fits an int64)
        ids: list[int | None] = list(map(int, native_digits))
    else:
        ids = list(map(parse_shard_id, native_digits))
    others: list[os.DirEntry] = []
    flat_ids: list[int | None] = []
    if ".npy" in text:
        for entry, d in zip(entries, digits):
            flat = None if d else FLAT_FILE.match(entry.name)
            if flat is not None:
                others.append(entry)
                flat_ids.append(parse_shard_id(flat.group(2)))
    links = list(map(os.DirEntry.is_symlink, dirs))
    if others or any(links) or None in ids or len(set(ids)) != len(ids):  # (the usual: every directory is plain)
        named = Counter(ids + flat_ids)
        is_plain = [shard_id is not None and named[shard_id] == 1 and not link for shard_id, link in zip(ids, links)]
        others += [e for e, p in zip(dirs, is_plain) if not p]
        ids, dirs = list(compress(ids, is_plain)), list(compress(dirs, is_plain))
    by_id = np.argsort(np.fromiter(ids, np.int64, len(ids))).tolist()  # listed in id order
    return list(map(ids.__getitem__, by_id)), list(map(dirs.__getitem__, by_id)), others  # type: ignore[arg-type]


def _found_whole(fd: int, resolved_root: str, ids: list[int], dirs: list[os.DirEntry], journal: Journal | None,
                 pool: Executor | None, problems: list[Problem]) -> Iterator[list[Candidate]]:
    """The plain shard directories as candidates, a batch at a time: vouched for by the journal, or listed."""
    batches = [(ids[s:s + WHOLE_BATCH], dirs[s:s + WHOLE_BATCH]) for s in range(0, len(ids), WHOLE_BATCH)]
    names = [list(map(attrgetter("name"), part)) for _, part in batches]
    vouching = journal is not None and len(journal) > 0
    if vouching:
        encoded = [_encode(part) for part in names[:1]]
        submit = pool.submit if pool is not None else _now
        ahead = [submit(read_heads, fd, encoded[0], 0)] if batches else []
    for k, (part_ids, part_dirs) in enumerate(batches):
        part_names = names[k]
        if vouching:
            if k + 1 < len(batches):  # the next batch is lstat-ed meanwhile
                encoded.append(_encode(names[k + 1]))
                ahead.append(submit(read_heads, fd, encoded[k + 1], 0))
            recorded = _vouched(part_names, encoded[k], ahead[k].result(), journal)  # type: ignore[arg-type]
        else:
            recorded = [None] * len(part_ids)
        if None not in recorded:  # the usual with a journal: no directory to list
            yield list(map(Candidate, part_ids, repeat("native"), part_names, repeat(None), recorded))
            continue
        batch = []
        for shard_id, entry, fields in zip(part_ids, part_dirs, recorded):
            name = entry.name
            if fields is not None:
                batch.append(Candidate(shard_id, "native", name, None, fields))
                continue
            files, inner_escape = _native_files(resolved_root, entry.path, name)
            if inner_escape is not None:
                problems.append(Problem(name, f"{inner_escape}; {LEFT_OUT}", shard_id))
            elif not files:
                problems.append(Problem(name, "shard directory holds no <field>.npy files", shard_id))
            else:
                batch.append(Candidate(shard_id, "native", name, files))
        if batch:
            yield batch


def _encode(names: list[str]) -> list[bytes]:
    return "\0".join(names).encode("utf-8", "surrogateescape").split(b"\0")


def _now(fn: Callable[..., Heads], *args: object) -> Future[Heads]:
    done: Future[Heads] = Future()
    done.set_result(fn(*args))
    return done


def _vouched(names: list[str], encoded: list[bytes], st: Heads, journal: Journal) -> list[tuple[str, ...] | None]:
    """The field names the journal records for each directory of ``names`` if it vouches for it, else None.

    What ``Journal.fields`` answers one directory at a time, for all of them at once: ``st``
    holds their ``lstat`` (the journal names a directory by inode and mtime), each line is
    compared with the stamp its directory has now, and each distinct list of names is checked
    once (by ``Journal.fields`` itself).
    """
    is_dir = ((st.errno == 0) & (st.mode & 0o170000 == stat.S_IFDIR)).tolist()
    stamps = list(map(b"%d %d ".__mod__, zip(st.ino.tolist(), st.mtime_ns.tolist())))
    # name -> "<inode> <mtime_ns> <field> ...": read here for 10^5 directories at once
    lines = list(map(journal._lines.get, encoded, repeat(b"")))
    n = len(names)
    known: dict[bytes, tuple[str, ...] | None] = {}  # the field names of each distinct line ending

    def names_of(k: int) -> tuple[str, ...] | None:
        rest = lines[k][len(stamps[k]):]
        if rest not in known:
            recorded = journal.fields(names[k], int(st.ino[k]), int(st.mtime_ns[k]))
            known[rest] = tuple(sorted(n for n, _ in recorded)) if recorded is not None else None
        return known[rest]

    # (None: gone meanwhile, or changed; listed, which says so)
    first = next((k for k in range(n) if is_dir[k] and lines[k].startswith(stamps[k])), None)
    if first is None:
        return [None] * n
    fields = names_of(first)
    rest = lines[first][len(stamps[first]):]
    # Every line with the first one's ending at once (a cache's shards share one list of names) ...
    same = list(map(bytes.__eq__, lines, map(bytes.__add__, stamps, repeat(rest))))
    out = [fields if s and d else None for s, d in zip(same, is_dir)]
    # ... and the others (shards of a writer of other fields) one by one.
    for k in compress(range(n), map(operator.not_, same)):
        if is_dir[k] and lines[k].startswith(stamps[k]):
            out[k] = names_of(k)
    return out


def _careful(resolved_root: str, entries: list[os.DirEntry],
             journal: Journal | None) -> tuple[dict[int, Candidate], list[Problem]]:
    """Discovery name by name, in name order: what ids named twice, links and flat files need."""
    found: dict[int, Candidate] = {}
    conflicts: dict[int, Problem] = {}
    problems: list[Problem] = []
    for entry in sorted(entries, key=attrgetter("name")):
        name = entry.name
        native = NATIVE_DIR.match(name)
        if native is not None:
            if not entry.is_dir():
                continue
            shard_id = parse_shard_id(native.group(1))
            if shard_id is None:
                problems.append(_bad_id(name, native.group(1)))
                continue
            escape = _escape(resolved_root, entry, name)
            recorded = None
            if journal is not None and escape is None and len(journal):
                try:
                    recorded = journal.fields(name, entry.inode(), entry.stat(follow_symlinks=False).st_mtime_ns)
                except OSError:  # gone meanwhile: listed below, which says so
                    recorded = None
            if recorded is not None:
                files, inner_escape = dict(recorded), None
            else:
                files, inner_escape = ({}, None) if escape else _native_files(resolved_root, entry.path, name)
            if escape or inner_escape:
                problems.append(Problem(name, f"{escape or inner_escape}; {LEFT_OUT}", shard_id))
                conflicts[shard_id] = problems[-1]
                continue
            other = found.get(shard_id)
            if other is not None:
                conflicts[shard_id] = Problem(
                    name, f"shard id {shard_id} is also {other.where}; keep one of the two", shard_id
                )
                continue
            found[shard_id] = Candidate(shard_id, "native", name, files)
            continue
        flat = FLAT_FILE.match(name)
        if flat is None or not entry.is_file():
            continue
        field_name, shard_id = flat.group(1), parse_shard_id(flat.group(2))
        if shard_id is None:
            problems.append(_bad_id(name, flat.group(2)))
            continue
        escape = _escape(resolved_root, entry, name)
        if escape is not None:
            problems.append(Problem(name, f"{escape}; {LEFT_OUT}", shard_id))
            conflicts[shard_id] = problems[-1]
            continue
        cand = found.setdefault(shard_id, Candidate(shard_id, "flat", name))
        if cand.layout != "flat":
            conflicts[shard_id] = Problem(
                name, f"shard id {shard_id} is also the directory {cand.where}; keep one layout for it", shard_id
            )
        elif field_name in cand.files:
            conflicts[shard_id] = Problem(
                name, f"shard id {shard_id} of field {field_name!r} is also {cand.files[field_name]}; "
                "keep one of the two", shard_id
            )
        else:
            cand.files[field_name] = name
    problems += [p for p in conflicts.values() if p not in problems]
    for shard_id in conflicts:
        found.pop(shard_id, None)
    return found, problems
