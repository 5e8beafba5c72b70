"""Finding shards under a cache root in the native and the flat layout, by name (no file is read)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path

from shardstore.manifest.journal import Journal
from shardstore.manifest.model import Problem
from shardstore.store.layout import (
    FLAT_FILE,
    NATIVE_DIR,
    NATIVE_FILE,
    OutsideRootError,
    check_within,
    is_temporary,
    parse_shard_id,
)

LEFT_OUT = "the shard is left out"


@dataclass(slots=True)
class Candidate:
    """A shard found by name: its id, layout, where it is, and its field files (paths relative to the root)."""

    id: int
    layout: str
    where: str  # the shard directory, or the first flat file seen
    files: dict[str, str] = field(default_factory=dict)


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
            if m and not is_temporary(f.name) and f.is_file():
                rel = f"{dir_name}/{f.name}"
                escape = _escape(resolved_root, f, rel)
                if escape is not None:
                    return {}, escape
                files[m.group(1)] = rel
    return files, None


def _bad_id(name: str, digits: str) -> Problem:
    return Problem(name, f"shard id {digits[:24]}{'...' if len(digits) > 24 else ''} is larger than {2**63 - 1:,} "
                         f"(ids are 64-bit); rename it with a smaller id; {LEFT_OUT}")


def discover_shards(root: Path, entries: list[os.DirEntry] | None = None, *,
                    journal: Journal | None = None) -> tuple[dict[int, Candidate], list[Problem]]:
    """Return the shards under ``root`` by id (sorted), and the names that cannot be used as a shard.

    ``entries`` limits discovery to those entries of the root (all of them by default). With
    ``journal``, a native directory the journal vouches for (same inode and mtime) is not
    listed: its files are the journal's.
    Temporary names of unfinished writers (hidden, ``.tmp``) are skipped silently. A shard
    directory or file that is a symlink to somewhere outside the root is left out (and never
    read): a cache only ever serves what lies inside it.
    """
    resolved_root = os.path.realpath(root)
    found: dict[int, Candidate] = {}
    conflicts: dict[int, Problem] = {}
    problems: list[Problem] = []
    for entry in sorted(list_root(root) if entries is None else entries, key=attrgetter("name")):
        name = entry.name
        # A name that matches either pattern is never a temporary one (no leading dot, no ".tmp", ends in a digit
        # or ".npy"), so temporaries fall through both tests.
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
    shards: dict[int, Candidate] = {}
    for shard_id in sorted(found):
        cand = found[shard_id]
        if shard_id in conflicts:
            continue
        if not cand.files:
            problems.append(Problem(cand.where, "shard directory holds no <field>.npy files", shard_id))
            continue
        shards[shard_id] = cand
    return shards, problems
