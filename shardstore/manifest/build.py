"""``build_manifest``: discover shards, validate their headers (incrementally), and write ``manifest.json`` atomically."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from shardstore.errors import ManifestError
from shardstore.manifest.checksum import checksum_files
from shardstore.manifest.discover import LEFT_OUT, Candidate, discover_shards
from shardstore.store.manifest import FieldSpec, FileEntry, Manifest, Problem, ShardEntry
from shardstore.store.snapshot import write_manifest
from shardstore.manifest.scan import FileInfo, Scan, one_line, previous_manifest
from shardstore.store.atomic import remove_stale_temporaries
from shardstore.store.groups import GroupSpec, read_group_specs
from shardstore.store.layout import MANIFEST_NAME, OUTSIDE_ROOT_FIX, OutsideRootError



@dataclass
class BuildReport:
    """What a build found: the manifest, the shards left out and why, and how much was actually read."""

    manifest: Manifest
    path: Path | None
    #: every file's header is read: values are never taken from the previous manifest unchecked
    headers_read: int = 0
    #: files with the size and mtime the previous manifest recorded (their checksum is carried over)
    files_reused: int = 0
    files_checksummed: int = 0
    ignored_fields: dict[str, int] = field(default_factory=dict)
    #: shards that are used without (part of) a field group, and why: missing or bad files of the group
    incomplete_groups: list[Problem] = field(default_factory=list)
    #: files whose content no longer matches the checksum recorded for them; the old checksum is kept
    changed: list[Problem] = field(default_factory=list)

    @property
    def problems(self) -> list[Problem]:
        """The shards left out, one line each."""
        return self.manifest.left_out


def _majority_specs(shards: dict[int, dict[str, FileInfo]]) -> tuple[dict[str, FieldSpec], dict[str, int]]:
    """Fields present in at least half of the shards, each with its most common dtype and per-sample shape."""
    presence = Counter(name for files in shards.values() for name in files)
    required = {n for n, c in presence.items() if 2 * c >= len(shards)}
    ignored = {n: c for n, c in presence.items() if n not in required}
    specs = {}
    for name in sorted(required):
        votes = Counter((info.dtype.str, info.shape[1:]) for files in shards.values() if (info := files.get(name)))
        (dtype, shape), _ = votes.most_common(1)[0]
        specs[name] = FieldSpec(np.dtype(dtype), shape)
    return specs, ignored


def _digits(cand: Candidate) -> int:
    """Width of the id in the shard's names (``shard_000042`` is 6, ``images_42.npy`` is 2)."""
    name = cand.where if cand.layout == "native" else cand.where[: -len(".npy")]
    return len(name.rsplit("_", 1)[1])


def _missing_name(cand: Candidate, name: str) -> str:
    return f"{cand.where}/{name}.npy" if cand.layout == "native" else f"{name}_{str(cand.id).zfill(_digits(cand))}.npy"


def build_manifest(
    root: str | os.PathLike[str],
    *,
    checksum: bool = False,
    incremental: bool = True,
    write: bool = True,
    progress: Callable[[int], None] | None = None,
) -> BuildReport:
    """Discover and validate the shards under ``root`` and write ``root/manifest.json`` atomically.

    Only ``.npy`` headers are read (a page per file); every entry is derived from its file,
    and the previous manifest only tells which files are unchanged (same size and mtime),
    so their checksums carry over. A changed file with a recorded checksum is hashed again
    and, if its content differs, keeps the old checksum and is listed in ``report.changed``
    (``verify`` then fails on it). ``incremental=False`` ignores the previous manifest and
    its checksums (with ``checksum`` the new content is recorded instead). Bad shards are
    left out and listed in ``report.problems``; a cache that is still growing is normal.
    With ``checksum`` every file without a checksum is hashed (``progress`` gets bytes).
    Temporaries of earlier manifest writers that were killed are removed.
    """
    root = Path(root)
    if not root.exists():
        raise ManifestError(f"{root} does not exist; pass the directory that holds the shards")
    if not root.is_dir():
        raise ManifestError(f"{root} is not a directory; pass the directory that holds the shards")
    before = previous_manifest(root)
    previous = before.files if incremental else {}
    generation = before.generation + 1
    candidates, problems = discover_shards(root)
    if not candidates and not problems:
        raise ManifestError(
            f"no shards in {root}; expected shard_<id>/<field>.npy directories or <field>_<id>.npy files"
        )

    groups = read_group_specs(root)
    group_of = {name: g.name for g in groups.values() for name in g.fields}
    report = BuildReport(Manifest({}, []), None)
    scan = Scan(root, previous)

    def read(rel: str) -> FileInfo | str | None:
        result = scan.read(rel)
        if isinstance(result, FileInfo):
            report.headers_read += 1
            report.files_reused += result.unchanged
        return result

    good: dict[int, dict[str, FileInfo]] = {}
    group_files: dict[int, dict[str, FileInfo | str]] = {}
    for shard_id, cand in candidates.items():
        files: dict[str, FileInfo] = {}
        bad: Problem | None = None
        extra: dict[str, FileInfo | str] = {}
        for name, rel in sorted(cand.files.items()):
            if name in group_of:  # a missing or bad group file costs the shard the group, not its place
                result = read(rel)
                if result is not None:
                    extra[name] = result
                continue
            result = read(rel)
            if result is None:  # deleted between listing and reading: the cache is changing, not corrupt
                bad = Problem(rel, f"vanished while the manifest was built; {LEFT_OUT}", shard_id)
                break
            if isinstance(result, str):
                bad = Problem(rel, f"{result}; {LEFT_OUT}", shard_id)
                break
            files[name] = result
        if bad is None:
            lengths = {name: info.shape[0] for name, info in files.items()}
            if len(set(lengths.values())) > 1:
                short = min(lengths, key=lengths.__getitem__)
                long = max(lengths, key=lengths.__getitem__)
                bad = Problem(
                    files[short].entry.path,
                    f"{lengths[short]:,} samples, but {files[long].entry.path} has {lengths[long]:,} "
                    f"(fields of unequal length); {LEFT_OUT}",
                    shard_id,
                )
        if bad is not None:
            problems.append(bad)
        else:
            good[shard_id] = files
            group_files[shard_id] = extra

    specs, report.ignored_fields = _majority_specs(good) if good else ({}, {})
    if good and not specs:
        raise ManifestError(f"the shards in {root} hold only fields of declared groups ({', '.join(sorted(groups))}); "
                            "a cache needs its own fields (e.g. images) besides the groups added to it")
    for g in groups.values():
        for name, (dtype, shape) in g.fields.items():
            specs[name] = FieldSpec(dtype, shape, g.name)
    shards: list[ShardEntry] = []
    for shard_id, files in good.items():
        cand = candidates[shard_id]
        bad = None
        for name, spec in specs.items():
            if spec.group is not None:
                continue
            info = files.get(name)
            if info is None:
                bad = Problem(_missing_name(cand, name), f"field {name!r} is missing (the other shards have it); {LEFT_OUT}", shard_id)
            elif info.dtype != spec.dtype:
                bad = Problem(info.entry.path, f"dtype {info.dtype}, but the other shards' {name!r} is {spec.dtype}; {LEFT_OUT}", shard_id)
            elif info.shape[1:] != spec.shape:
                bad = Problem(
                    info.entry.path,
                    f"per-sample shape {list(info.shape[1:])}, but the other shards' {name!r} is {list(spec.shape)}; {LEFT_OUT}",
                    shard_id,
                )
            if bad is not None:
                break
        if bad is not None:
            problems.append(bad)
            continue
        num_samples = files[next(n for n, f in specs.items() if f.group is None)].shape[0]
        entries = {n: files[n].entry for n, f in specs.items() if f.group is None}
        for g in groups.values():
            entries |= _group_entries(g, group_files[shard_id], cand, num_samples, report.incomplete_groups, shard_id)
        shards.append(ShardEntry(shard_id, num_samples, cand.layout, entries, _digits(cand),
                                 before.since.get(shard_id, generation)))

    fix = f"restore the file, or accept its new content with `shardstore build-manifest --full --checksum {root}`"
    for rel, why in scan.changed:
        report.changed.append(Problem(rel, f"{why}; the recorded checksum is kept so `shardstore verify` fails "
                                           f"until you {fix}"))
    if checksum:
        shards, failed = _add_checksums(root, shards, progress, report)
        problems.extend(failed)
    problems.sort(key=lambda p: (p.shard_id if p.shard_id is not None else -1, p.path))
    report.manifest = Manifest(specs, shards, problems, generation=generation)
    if write and shards:
        remove_stale_temporaries(root, MANIFEST_NAME)
        report.path = write_manifest(root, report.manifest)
    return report


def _group_entries(group: GroupSpec, found: dict[str, FileInfo | str], cand: Candidate, num_samples: int,
                   incomplete: list[Problem], shard_id: int) -> dict[str, FileEntry]:
    """The group's file entries of one shard if every one is there and as declared, else none (with the reason)."""
    if not any(name in found for name in group.fields):
        return {}
    fix = f"the shard is used without group {group.name!r}; write the group's files again"
    for name, (dtype, shape) in group.fields.items():
        info = found.get(name)
        reason = None
        if info is None:
            reason = "missing (the group's other files are there)"
        elif isinstance(info, str):
            reason = info
        elif info.dtype != dtype or info.shape[1:] != shape:
            reason = f"is {info.dtype}{list(info.shape[1:])}, the group declares {dtype}{list(shape)}"
        elif info.shape[0] != num_samples:
            reason = f"has {info.shape[0]:,} rows, the shard {num_samples:,}"
        if reason is not None:
            path = info.entry.path if isinstance(info, FileInfo) else cand.files.get(name, _missing_name(cand, name))
            incomplete.append(Problem(path, f"{reason}; {fix}", shard_id))
            return {}
    return {name: found[name].entry for name in group.fields}  # type: ignore[union-attr]


def _add_checksums(
    root: Path, shards: list[ShardEntry], progress: Callable[[int], None] | None, report: BuildReport
) -> tuple[list[ShardEntry], list[Problem]]:
    todo = [root / f.path for s in shards for f in s.files.values() if f.checksum is None]
    digests = checksum_files(todo, progress=progress, resolved_root=os.path.realpath(root))
    report.files_checksummed = len(todo)
    out, failed = [], []
    for s in shards:
        files = {}
        for name, f in s.files.items():
            digest = f.checksum or digests[root / f.path]
            if isinstance(digest, OutsideRootError):
                failed.append(Problem(f.path, f"resolves to {digest.real}, outside the cache root; {OUTSIDE_ROOT_FIX}; "
                                              f"{LEFT_OUT}", s.id))
                break
            if isinstance(digest, OSError):
                failed.append(Problem(f.path, f"cannot be read ({one_line(digest)}); {LEFT_OUT}", s.id))
                break
            files[name] = replace(f, checksum=digest)
        else:
            out.append(replace(s, files=files))
    return out, failed
