"""Field groups: sets of fields added to existing shards later (e.g. cached teacher outputs), all or none per shard.

A group is declared by ``ROOT/<group>.fields.json``, which names its fields with their dtype
and per-sample shape and carries free-form ``meta`` for the program that writes it. A shard
has a group when every field of it is present with the declared dtype and shape and as many
rows as the shard; the manifest lists the group's files only for those shards, so a group
may cover part of a cache (one that is still being filled) without any shard being left out.

``add_shard_fields`` writes a group's files into one shard crash-safely: every file goes to
a hidden temporary name first, is fsynced, then renamed into place; a shard where a crash
left only some of them is simply incomplete and is rewritten by the next run.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shardstore.errors import ManifestError
from shardstore.store.atomic import fsync_dir, remove_stale_temporaries, temporary_sibling, write_bytes_atomic
from shardstore.store.layout import FIELD_NAME

GROUP_FORMAT = "shardstore-field-group"
GROUP_VERSION = 1
GROUP_FILE = re.compile(r"^([A-Za-z][A-Za-z0-9_]*)\.fields\.json$")


def group_file(root: str | os.PathLike[str], name: str) -> Path:
    """Where the declaration of group ``name`` lives."""
    return Path(root) / f"{name}.fields.json"


@dataclass(frozen=True)
class GroupSpec:
    """A group's name, its fields ``{name: (dtype, per-sample shape)}`` and its writer's ``meta``."""

    name: str
    fields: dict[str, tuple[np.dtype, tuple[int, ...]]]
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        doc = {"format": GROUP_FORMAT, "version": GROUP_VERSION, "group": self.name,
               "fields": {n: {"dtype": d.str, "shape": list(s)} for n, (d, s) in self.fields.items()},
               "meta": self.meta}
        return json.dumps(doc, indent=1, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str) -> GroupSpec:
        fix = "delete it (and the group's files) or write it again"
        try:
            doc = json.loads(text)
            if not isinstance(doc, dict) or doc.get("format") != GROUP_FORMAT:
                raise ValueError("not a field-group declaration")
            if not isinstance(doc.get("version"), int) or doc["version"] > GROUP_VERSION:
                raise ValueError(f"version {doc.get('version')!r} is newer than this shardstore reads ({GROUP_VERSION})")
            name = str(doc["group"])
            fields: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}
            for fname, spec in doc["fields"].items():
                dtype = np.dtype(str(spec["dtype"]))
                if not FIELD_NAME.match(fname) or dtype.hasobject or dtype.fields is not None:
                    raise ValueError(f"field {fname!r} of dtype {dtype} is not allowed")
                fields[fname] = (dtype, tuple(int(d) for d in spec["shape"]))
            meta = doc.get("meta", {})
            if not FIELD_NAME.match(name) or not fields or not isinstance(meta, dict):
                raise ValueError("needs a group name, at least one field and a meta mapping")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ManifestError(f"{source}: bad field-group declaration ({exc}); {fix}") from None
        return cls(name, fields, meta)


def read_group_specs(root: str | os.PathLike[str]) -> dict[str, GroupSpec]:
    """Every group declared under ``root``, by name; ``ManifestError`` on a bad or conflicting declaration."""
    specs: dict[str, GroupSpec] = {}
    owner: dict[str, str] = {}
    with os.scandir(root) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            m = GROUP_FILE.match(entry.name)
            if not m or not entry.is_file():
                continue
            try:
                text = Path(entry.path).read_text()
            except (OSError, UnicodeDecodeError) as exc:
                raise ManifestError(f"{entry.path}: cannot be read ({exc}); fix its permissions or delete it") from None
            spec = GroupSpec.from_json(text, entry.path)
            if spec.name != m.group(1):
                raise ManifestError(f"{entry.path} declares group {spec.name!r}; its file name must be "
                                    f"{spec.name}.fields.json")
            for fname in spec.fields:
                if fname in owner:
                    raise ManifestError(f"field {fname!r} is declared by both {owner[fname]} and {entry.path}; "
                                        "a field belongs to one group")
                owner[fname] = entry.path
            specs[spec.name] = spec
    return specs


def write_group_spec(root: str | os.PathLike[str], spec: GroupSpec) -> Path:
    """Write (or replace) the declaration of ``spec`` atomically."""
    path = group_file(root, spec.name)
    write_bytes_atomic(path, spec.to_json().encode())
    return path


def add_shard_fields(targets: dict[str, Path], arrays: dict[str, np.ndarray], *, fsync: bool = True) -> None:
    """Write ``arrays[name]`` to ``targets[name]`` for every field, each file visible only when complete.

    All files are written and fsynced under temporary names before the first rename, so a
    crash leaves whole files only (possibly not all of them: the group is then incomplete
    for that shard and is rewritten on the next run). Existing files of the set are deleted
    before the first rename, so old and new files never form a complete-looking mix.
    """
    if set(targets) != set(arrays):
        raise ValueError(f"targets {sorted(targets)} and arrays {sorted(arrays)} name different fields")
    temps: dict[str, Path] = {}
    try:
        for name, path in targets.items():
            tmp = temporary_sibling(path)
            temps[name] = tmp
            with open(tmp, "wb") as f:
                np.lib.format.write_array(f, np.ascontiguousarray(arrays[name]), allow_pickle=False)
                f.flush()
                if fsync:
                    os.fsync(f.fileno())
        # Remove what an earlier, interrupted run left first: old and new files must never make a whole set.
        for path in targets.values():
            path.unlink(missing_ok=True)
        for name, path in targets.items():
            os.replace(temps[name], path)
    except BaseException:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
        raise
    if fsync:
        for directory in {p.parent for p in targets.values()}:
            fsync_dir(directory)



def remove_group(root: str | os.PathLike[str], spec: GroupSpec) -> int:
    """Delete a group's files from every shard directory (or flat file) under ``root``, then its declaration.

    Files go first: a crash midway leaves a declared group that some shards lack (filled
    again by its writer), never undeclared files that would pass for the cache's own fields.
    Returns the number of files deleted. Rebuild the manifest afterwards.
    """
    root = Path(root)
    names = set(spec.fields)
    removed = 0
    for entry in os.scandir(root):
        if entry.is_dir():
            for name in names:
                path = Path(entry.path) / f"{name}.npy"
                if path.is_file():
                    path.unlink()
                    removed += 1
        elif entry.name.endswith(".npy") and entry.name.rsplit("_", 1)[0] in names:
            os.unlink(entry.path)
            removed += 1
    group_file(root, spec.name).unlink(missing_ok=True)
    fsync_dir(root)
    return removed
