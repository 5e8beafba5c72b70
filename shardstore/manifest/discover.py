"""Finding shards under a cache root in the native and the flat layout, by name only (nothing is opened)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from shardstore.manifest.model import Problem
from shardstore.store.layout import FLAT_FILE, NATIVE_DIR, NATIVE_FILE, is_temporary


@dataclass
class Candidate:
    """A shard found by name: its id, layout, where it is, and its field files (paths relative to the root)."""

    id: int
    layout: str
    where: str  # the shard directory, or the first flat file seen
    files: dict[str, str] = field(default_factory=dict)


def _native_files(dir_path: str, dir_name: str) -> dict[str, str]:
    files = {}
    with os.scandir(dir_path) as inner:
        for f in inner:
            m = NATIVE_FILE.match(f.name)
            if m and not is_temporary(f.name) and f.is_file():
                files[m.group(1)] = f"{dir_name}/{f.name}"
    return files


def discover_shards(root: Path) -> tuple[dict[int, Candidate], list[Problem]]:
    """Return the shards under ``root`` by id (sorted), and the names that cannot be used as a shard.

    Temporary names of unfinished writers (hidden, ``.tmp``) are skipped silently.
    """
    found: dict[int, Candidate] = {}
    conflicts: dict[int, Problem] = {}
    with os.scandir(root) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            name = entry.name
            if is_temporary(name):
                continue
            native = NATIVE_DIR.match(name)
            flat = FLAT_FILE.match(name)
            if native and entry.is_dir():
                shard_id = int(native.group(1))
                other = found.get(shard_id)
                if other is not None:
                    conflicts[shard_id] = Problem(
                        name, f"shard id {shard_id} is also {other.where}; keep one of the two", shard_id
                    )
                    continue
                found[shard_id] = Candidate(shard_id, "native", name, _native_files(entry.path, name))
            elif flat and entry.is_file():
                field_name, shard_id = flat.group(1), int(flat.group(2))
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
    problems = list(conflicts.values())
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
