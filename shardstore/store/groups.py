"""Field groups: sets of fields added to existing shards later (e.g. cached teacher outputs), all or none per shard.

A group is declared by ``ROOT/<group>.fields.json``, which names its fields with their dtype
and per-sample shape and carries free-form ``meta`` for the program that writes it. A shard
has a group when every field of it is present with the declared dtype and shape and as many
rows as the shard; the manifest lists the group's files only for those shards, so a group
may cover part of a cache (one that is still being filled) without any shard being left out.

A declaration is untrusted input (a cache may come from someone else, and deleting a group
deletes files), so it is checked when read: the group's name and fields are identifiers, each
field is named ``<group>_...``, and no field may be one of the cache's own fields or another
group's (as ``manifest.json`` records them). A group deletes only regular files it could have
written: ``<field>.npy`` in the cache's shard directories and ``<field>_<digits>.npy`` in the
root, never through a symbolic link.

``add_shard_fields`` writes a group's files into one shard crash-safely: every file goes to
a hidden temporary name first, is fsynced, then renamed into place; a shard where a crash
left only some of them is simply incomplete and is rewritten by the next run.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shardstore.errors import ConfigError, DiskFullError, ManifestError
from shardstore.store.atomic import (
    disk_full_error,
    fsync_dir,
    is_disk_full,
    remove_stale_temporaries,
    temporary_sibling,
    write_bytes_atomic,
)
from shardstore.store.layout import FIELD_NAME, FLAT_FILE, MANIFEST_NAME, NATIVE_DIR
from shardstore.store.writer import write_npy

log = logging.getLogger(__name__)

GROUP_FORMAT = "shardstore-field-group"
GROUP_VERSION = 1
GROUP_FILE = re.compile(r"([A-Za-z][A-Za-z0-9_]*)\.fields\.json")
#: a temporary of an interrupted ``write_group_spec``: ``.<group>.fields.json.tmp-<pid>-<hex>``
_GROUP_TEMP = re.compile(r"\.([A-Za-z][A-Za-z0-9_]*\.fields\.json)\.tmp-\d+-[0-9a-f]+")
#: names stay well below the 255-byte file-name limit with a field suffix, shard digits and a temporary suffix
MAX_GROUP_NAME = 64
MAX_FIELD_NAME = 128
MAX_DECLARATION_BYTES = 1 << 20
_NAME_RULE = "a letter followed by letters, digits or underscores"


def check_group_name(name: object) -> str:
    """Return ``name`` if it can name a group (a file in the root, the prefix of its fields), else ``ConfigError``."""
    if not isinstance(name, str) or not FIELD_NAME.fullmatch(name) or len(name) > MAX_GROUP_NAME:
        raise ConfigError(f"group name {name!r} is not allowed; use {_NAME_RULE} (at most {MAX_GROUP_NAME} "
                          "characters), e.g. teacher")
    return name


def _field_problem(group: str, name: object) -> str | None:
    """Why ``name`` cannot be a field of ``group``, or None."""
    if not isinstance(name, str) or not FIELD_NAME.fullmatch(name) or len(name) > MAX_FIELD_NAME:
        return f"field name {name!r} is not allowed; use {_NAME_RULE} (at most {MAX_FIELD_NAME} characters)"
    if not name.startswith(f"{group}_"):
        return f"field {name!r} of group {group!r} must be named {group}_<something>"
    return None


def group_file(root: str | os.PathLike[str], name: str) -> Path:
    """Where the declaration of group ``name`` lives (``ConfigError`` for a name that is not an identifier)."""
    return Path(root) / f"{check_group_name(name)}.fields.json"


@dataclass(frozen=True)
class GroupSpec:
    """A group's name, its fields ``{name: (dtype, per-sample shape)}`` and its writer's ``meta``."""

    name: str
    fields: dict[str, tuple[np.dtype, tuple[int, ...]]]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_group_name(self.name)
        for fname in self.fields:
            problem = _field_problem(self.name, fname)
            if problem is not None:
                raise ConfigError(problem)

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
                raise ValueError(f"version {doc.get('version')!r} is newer than this shardstore reads "
                                 f"({GROUP_VERSION})")
            name = doc["group"]
            if not isinstance(name, str) or not FIELD_NAME.fullmatch(name) or len(name) > MAX_GROUP_NAME:
                raise ValueError(f"group name {name!r} is not allowed; use {_NAME_RULE}")
            fields: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}
            for fname, spec in doc["fields"].items():
                problem = _field_problem(name, fname)
                if problem is not None:
                    raise ValueError(problem)
                dtype = np.dtype(str(spec["dtype"]))
                if dtype.hasobject or dtype.fields is not None:
                    raise ValueError(f"field {fname!r} of dtype {dtype} is not allowed")
                shape = spec["shape"]
                if (not isinstance(shape, list) or len(shape) > 32
                        or not all(type(d) is int and 0 <= d < 2**63 for d in shape)):
                    raise ValueError(f"field {fname!r} has shape {shape!r}; a shape is a list of sizes >= 0")
                fields[fname] = (dtype, tuple(shape))
            meta = doc.get("meta", {})
            if not fields or not isinstance(meta, dict):
                raise ValueError("needs at least one field and a meta mapping")
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError, OverflowError) as exc:
            raise ManifestError(f"{source}: bad field-group declaration ({exc}); {fix}") from None
        return cls(name, fields, meta)


def _manifest_owners(root: Path) -> dict[str, str | None]:
    """The fields ``manifest.json`` lists, with their group (None: a field of the cache itself); {} if unreadable.

    The manifest remembers which fields the shards had before any declaration claimed them,
    so an edited declaration cannot turn a field of the cache into a group's (deletable) field.
    """
    try:
        fd = os.open(root / MANIFEST_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return {}
            doc = json.loads(f.read())
    except (OSError, ValueError, RecursionError):  # missing or broken: build_manifest reports it
        return {}
    fields = doc.get("fields") if isinstance(doc, dict) else None
    if not isinstance(fields, dict):
        return {}
    return {n: f.get("group") if isinstance(f, dict) and isinstance(f.get("group"), str) else None
            for n, f in fields.items()}


def _read_declaration(path: str) -> str:
    """The text of a declaration: a regular file (a link is not followed) of at most ``MAX_DECLARATION_BYTES``."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        data = f.read(MAX_DECLARATION_BYTES + 1)
    if len(data) > MAX_DECLARATION_BYTES:
        raise OSError(errno.EFBIG, f"larger than {MAX_DECLARATION_BYTES:,} bytes, too large for a declaration")
    return data.decode()


def read_group_specs(root: str | os.PathLike[str]) -> dict[str, GroupSpec]:
    """Every group declared under ``root``, by name; ``ManifestError`` on a bad or conflicting declaration."""
    root = Path(root)
    specs: dict[str, GroupSpec] = {}
    owner: dict[str, tuple[str, str]] = {}  # field: (declaration, group)
    with os.scandir(root) as entries:
        found = sorted((e for e in entries if GROUP_FILE.fullmatch(e.name)), key=lambda e: e.name)
    for entry in found:
        if entry.is_symlink() or not entry.is_file(follow_symlinks=False):
            raise ManifestError(f"{entry.path} is not a regular file (a symbolic link or other); a declaration is "
                                "read only as a regular file in the cache root: replace it with the file or delete it")
        try:
            text = _read_declaration(entry.path)
        except (OSError, UnicodeDecodeError) as exc:
            raise ManifestError(f"{entry.path}: cannot be read ({exc}); fix its permissions or delete it") from None
        spec = GroupSpec.from_json(text, entry.path)
        if spec.name != GROUP_FILE.fullmatch(entry.name).group(1):  # type: ignore[union-attr]
            raise ManifestError(f"{entry.path} declares group {spec.name!r}; its file name must be "
                                f"{spec.name}.fields.json")
        for fname in spec.fields:
            if fname in owner:
                raise ManifestError(f"field {fname!r} is declared by both {owner[fname][0]} and {entry.path}; "
                                    "a field belongs to one group")
            owner[fname] = (entry.path, spec.name)
        specs[spec.name] = spec
    if specs:
        listed = _manifest_owners(root)
        for fname, (path, group) in owner.items():
            if fname in listed and listed[fname] != group:
                what = "a field of the cache itself" if listed[fname] is None else f"a field of group {listed[fname]!r}"
                raise ManifestError(f"{path} declares {fname!r}, which {root / MANIFEST_NAME} lists as {what}; a group "
                                    f"may declare only the fields it adds: remove {fname!r} from it or delete it")
    return specs


def write_group_spec(root: str | os.PathLike[str], spec: GroupSpec) -> Path:
    """Write (or replace) the declaration of ``spec`` atomically."""
    path = group_file(root, spec.name)
    remove_stale_temporaries(root, path.name)  # what a killed earlier write of it left
    write_bytes_atomic(path, spec.to_json().encode())
    return path


def remove_stale_declaration_temporaries(root: str | os.PathLike[str]) -> int:
    """Delete the temporaries of declarations whose writer was killed (``.<group>.fields.json.tmp-<pid>-<hex>``)."""
    try:
        with os.scandir(root) as entries:
            names = {m.group(1) for e in entries if (m := _GROUP_TEMP.fullmatch(e.name))}
    except OSError:
        return 0
    return sum(remove_stale_temporaries(root, name) for name in sorted(names))


def add_shard_fields(targets: dict[str, Path], arrays: dict[str, np.ndarray], *, fsync: bool = True) -> None:
    """Write ``arrays[name]`` to ``targets[name]`` for every field, each file visible only when complete.

    All files are written and fsynced under temporary names before the first rename, so a
    crash leaves whole files only (possibly not all of them: the group is then incomplete
    for that shard and is rewritten on the next run). Existing files of the set are deleted
    before the first rename, so old and new files never form a complete-looking mix. On any
    error the temporaries are deleted; a full disk is a one-line ``DiskFullError``.
    """
    if set(targets) != set(arrays):
        raise ValueError(f"targets {sorted(targets)} and arrays {sorted(arrays)} name different fields")
    temps: dict[str, Path] = {}
    writing: Path | None = None
    renaming: Path | None = None
    try:
        for name, path in targets.items():
            writing, tmp = path, temporary_sibling(path)
            temps[name] = tmp
            with open(tmp, "xb") as f:  # "x": never through a name that already exists (or a planted link)
                write_npy(f, arrays[name])  # plain writes: a full disk is ENOSPC, not a bare OSError
                f.flush()
                if fsync:
                    os.fsync(f.fileno())
        writing = None
        # Remove what an earlier, interrupted run left first: old and new files must never make a whole set.
        for path in targets.values():
            path.unlink(missing_ok=True)
        for name, path in targets.items():
            renaming = path
            os.replace(temps[name], path)
    except BaseException as exc:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
        if is_disk_full(exc) and renaming is not None:  # the old files are gone: say so, not "nothing replaced"
            raise DiskFullError(f"no space left on device: renaming {renaming} into place; the shard now lacks "
                                "this group (the next run writes it again): free space on that file system and "
                                "run again") from exc
        if is_disk_full(exc):
            needed = sum(a.nbytes + 128 for a in arrays.values())  # 128: an .npy header
            raise disk_full_error(writing or next(iter(targets.values())), needed) from exc
        raise
    if fsync:
        for directory in {p.parent for p in targets.values()}:
            fsync_dir(directory)


def _remove_in_dir(root_fd: int, dir_name: str, file_names: list[str], left: list[str]) -> int:
    """Unlink the regular files ``file_names`` of the real directory ``dir_name`` (relative to ``root_fd``)."""
    try:  # O_NOFOLLOW: a shard directory swapped for a link since the scan is not entered
        fd = os.open(dir_name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=root_fd)
    except OSError:
        left.append(dir_name)
        return 0
    removed = 0
    try:
        for name in file_names:
            try:
                mode = os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode
            except FileNotFoundError:
                continue
            if stat.S_ISREG(mode):
                os.unlink(name, dir_fd=fd)  # relative to the opened directory: no path is resolved again
                removed += 1
            else:
                left.append(f"{dir_name}/{name}")
        if removed:
            os.fsync(fd)
    finally:
        os.close(fd)
    return removed


def remove_group(root: str | os.PathLike[str], name: str) -> int:
    """Delete the files of the group declared as ``name`` from this cache's shards, then its declaration.

    What is deleted is decided by the declaration on disk (checked by ``read_group_specs``):
    ``<field>.npy`` in the directories ``shard_<digits>`` directly under ``root`` and
    ``<field>_<digits>.npy`` in ``root`` itself, regular files only. Symbolic links (a linked
    shard directory or file) are never followed nor deleted: they are logged and left alone.
    Files go before the declaration: a crash midway leaves a declared group that some shards
    lack (filled again by its writer), never undeclared files that would pass for the cache's
    own fields. Returns the number of files deleted (0 without a declaration). Rebuild the
    manifest afterwards.
    """
    root = Path(root)
    spec = read_group_specs(root).get(check_group_name(name))
    if spec is None:
        return 0
    left: list[str] = []
    removed = 0
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with os.scandir(root_fd) as entries:
            listing = sorted(entries, key=lambda e: e.name)
        native = [f"{n}.npy" for n in spec.fields]
        for entry in listing:
            if NATIVE_DIR.fullmatch(entry.name):
                if entry.is_symlink():
                    left.append(entry.name)
                elif entry.is_dir(follow_symlinks=False):
                    removed += _remove_in_dir(root_fd, entry.name, native, left)
                continue
            flat = FLAT_FILE.fullmatch(entry.name)
            if flat is None or flat.group(1) not in spec.fields:
                continue
            if entry.is_file(follow_symlinks=False):
                os.unlink(entry.name, dir_fd=root_fd)
                removed += 1
            else:
                left.append(entry.name)
        try:
            os.unlink(group_file(root, name).name, dir_fd=root_fd)
        except FileNotFoundError:  # removed meanwhile by another process: the goal is reached
            pass
        os.fsync(root_fd)
    finally:
        os.close(root_fd)
    if left:
        log.warning("%s: group %r: left alone %d symbolic link(s) or non-file(s) where its files would be (%s); "
                    "a group deletes only regular files it wrote", root, name, len(left), ", ".join(left[:5]))
    return removed
