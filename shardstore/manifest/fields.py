"""A cache's fields, by majority over its shards, and each shard read checked against them into its table row.

Shards read one by one arrive as ``(candidate, own files, group files)``; shards read in bulk
as signatures (``bulk.Signature``), checked once with their first shard and named shard by
shard only when they fail.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from shardstore.manifest.bulk import Signature
from shardstore.manifest.discover import LEFT_OUT, Candidate
from shardstore.manifest.scan import FileInfo
from shardstore.manifest.table import Rows
from shardstore.store.groups import GroupSpec
from shardstore.store.manifest import FieldSpec, Manifest, Problem

#: a shard read one by one: its candidate, own files and group files (a group file may be a reason it is bad)
Read = tuple[Candidate, dict[str, FileInfo], dict[str, "FileInfo | str"]]


@dataclass
class ShardsRead:
    """The shards a build read: one by one (by id; a ``Problem`` if one left it out) and in bulk (by signature)."""

    groups: dict[str, GroupSpec]
    one_by_one: dict[int, Read | Problem] = field(default_factory=dict)
    signatures: dict[tuple, Signature] = field(default_factory=dict)

    @property
    def group_fields(self) -> dict[str, FieldSpec]:
        return {n: FieldSpec(d, s, g.name) for g in self.groups.values() for n, (d, s) in g.fields.items()}

    def any_good(self) -> bool:
        return bool(self.signatures) or any(not isinstance(r, Problem) for r in self.one_by_one.values())

    def left_out(self) -> list[Problem]:
        return [r for r in self.one_by_one.values() if isinstance(r, Problem)]


def own(fields: dict[str, FieldSpec]) -> dict[str, FieldSpec]:
    """The cache's own fields (not of a group)."""
    return {n: f for n, f in fields.items() if f.group is None}


def majority_specs(shards: ShardsRead, kept: int, base: Manifest | None) -> tuple[dict[str, FieldSpec], dict[str, int]]:
    """Fields present in at least half of the shards, each with its most common dtype and per-sample shape.

    ``kept`` rows of ``base`` (not read again) vote for the table's own fields as they are.
    Also the fields below half (ignored), with how many shards have them.
    """
    group_fields = shards.group_fields
    presence: Counter[str] = Counter()
    votes: dict[str, Counter] = {}
    total = kept

    def vote(name: str, dtype: np.dtype, shape: tuple[int, ...], count: int) -> None:
        presence[name] += count
        votes.setdefault(name, Counter())[(dtype.str, shape)] += count

    if base is not None and kept:
        for name, spec in own(base.fields).items():
            vote(name, spec.dtype, spec.shape, kept)
    for result in shards.one_by_one.values():
        if not isinstance(result, Problem):
            total += 1
            for name, info in result[1].items():
                vote(name, info.header.dtype, info.header.shape[1:], 1)
    for sig in shards.signatures.values():
        total += len(sig.cands)
        for name, parsed in zip(sig.names, sig.parsed):
            if name not in group_fields:
                vote(name, parsed.header.dtype, parsed.header.shape[1:], len(sig.cands))
    required = sorted(n for n, c in presence.items() if 2 * c >= total)
    ignored = {n: c for n, c in sorted(presence.items()) if 2 * c < total}
    specs = {}
    for name in required:
        (dtype, shape), _ = votes[name].most_common(1)[0]
        specs[name] = FieldSpec(np.dtype(dtype), shape)
    return specs, ignored


def fill_rows(shards: ShardsRead, specs: dict[str, FieldSpec], incomplete: list[Problem]) -> Rows:
    """Check each shard read against ``specs`` and fill its table row; a shard that fails becomes its ``Problem``.

    A shard whose group files are missing or not as declared keeps its place without the
    group; the reason goes to ``incomplete``.
    """
    rows = Rows(specs)
    fields = [(n, s) for n, s in specs.items() if s.group is None]
    if not fields:
        return rows
    for shard_id, result in list(shards.one_by_one.items()):
        if isinstance(result, Problem):
            continue
        cand, files, extra = result
        bad = check_shard(cand, fields, files)
        if bad is not None:
            shards.one_by_one[shard_id] = bad
            continue
        num_samples = files[fields[0][0]].header.shape[0]
        entries = {n: files[n] for n, _ in fields}
        for g in shards.groups.values():
            entries |= group_files(g, extra, cand, num_samples, incomplete, shard_id)
        rows.add(shard_id, num_samples, cand.layout, digits(cand.where, cand.layout), entries)
    group_fields = shards.group_fields
    for sig in shards.signatures.values():
        _signature_rows(shards, sig, fields, group_fields, rows, incomplete)
    return rows


def _signature_rows(shards: ShardsRead, sig: Signature, fields: list[tuple[str, FieldSpec]],
                    group_fields: dict[str, FieldSpec], rows: Rows, incomplete: list[Problem]) -> None:
    """The rows of a signature's shards: checked once with its first shard, named shard by shard if they fail."""
    def infos(cand: Candidate, i_of: dict[str, int], k: int) -> dict[str, FileInfo]:
        return {n: FileInfo(cand.files[n], sig.parsed[i].file_bytes, sig.mtimes[i][k], sig.parsed[i].header,
                            None, None, False) for n, i in i_of.items()}

    own_i = {n: i for i, n in enumerate(sig.names) if n not in group_fields}
    group_i = {n: i for i, n in enumerate(sig.names) if n in group_fields}
    first = sig.cands[0]
    if check_shard(first, fields, infos(first, own_i, 0)) is not None:
        for k, cand in enumerate(sig.cands):
            shards.one_by_one[cand.id] = check_shard(cand, fields, infos(cand, own_i, k))  # type: ignore[assignment]
        return
    num_samples = sig.parsed[own_i[fields[0][0]]].header.shape[0]
    names = [n for n, _ in fields]
    for g in shards.groups.values():
        trial: list[Problem] = []
        if group_files(g, infos(first, group_i, 0), first, num_samples, trial, first.id):
            names += list(g.fields)
        elif trial:  # every shard of the signature lacks the group for the same reason
            for k, cand in enumerate(sig.cands):
                group_files(g, infos(cand, group_i, k), cand, num_samples, incomplete, cand.id)
    index = {n: i for i, n in enumerate(sig.names)}
    rows.add_many([c.id for c in sig.cands], num_samples, sig.layout, sig.digits,
                  {n: (sig.parsed[index[n]].header.data_offset, sig.mtimes[index[n]], sig.value_ranges(index[n]))
                   for n in names})


def check_shard(cand: Candidate, fields: list[tuple[str, FieldSpec]], files: dict[str, FileInfo]) -> Problem | None:
    """Why a shard whose own files are ``files`` does not fit the cache's ``fields``, or None."""
    for name, spec in fields:
        info = files.get(name)
        if info is None:
            return Problem(missing_name(cand, name), f"field {name!r} is missing (the other shards have it); "
                                                     f"{LEFT_OUT}", cand.id)
        if info.header.dtype != spec.dtype:
            return Problem(info.rel, f"dtype {info.dtype}, but the other shards' {name!r} is {spec.dtype}; "
                                     f"{LEFT_OUT}", cand.id)
        if info.header.shape[1:] != spec.shape:
            return Problem(info.rel, f"per-sample shape {list(info.shape[1:])}, but the other shards' {name!r} "
                                     f"is {list(spec.shape)}; {LEFT_OUT}", cand.id)
    return None


def digits(where: str, layout: str) -> int:
    """Width of the id in a shard's name (``shard_000042`` is 6, ``images_42.npy`` is 2)."""
    name = where if layout == "native" else where[: -len(".npy")]
    return len(name.rsplit("_", 1)[1])


def missing_name(cand: Candidate, name: str) -> str:
    """Where the file of ``name`` would be in ``cand``'s shard."""
    if cand.layout == "native":
        return f"{cand.where}/{name}.npy"
    return f"{name}_{str(cand.id).zfill(digits(cand.where, 'flat'))}.npy"


def group_files(group: GroupSpec, found: dict[str, FileInfo | str], cand: Candidate, num_samples: int,
                 incomplete: list[Problem], shard_id: int) -> dict[str, FileInfo]:
    """The group's files of one shard if every one is there and as declared, else none (with the reason)."""
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
            path = info.rel if isinstance(info, FileInfo) else cand.files.get(name, missing_name(cand, name))
            incomplete.append(Problem(path, f"{reason}; {fix}", shard_id))
            return {}
    return {name: found[name] for name in group.fields}  # type: ignore[misc]
