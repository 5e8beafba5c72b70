"""``build_manifest``: discover shards, validate their headers (incrementally), and write the manifest atomically."""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shardstore.errors import ManifestError
from shardstore.manifest.bulk import Preread, Reader
from shardstore.manifest.changes import find_changes
from shardstore.manifest.checksum import checksum_files
from shardstore.manifest.discover import LEFT_OUT, Candidate, discover_shards, list_root
from shardstore.manifest.fields import (
    Read,
    ShardsRead,
    digits,
    fill_rows,
    majority_specs,
    own,
)
from shardstore.manifest.journal import Journal, read_journal
from shardstore.manifest.previous import Previous, previous_manifest
from shardstore.manifest.scan import FileInfo, Scan, one_line
from shardstore.manifest.table import Rows, column_dtypes, kept_columns, merge, take
from shardstore.store.atomic import remove_stale_temporaries
from shardstore.store.groups import read_group_specs
from shardstore.store.layout import MANIFEST_NAME, OUTSIDE_ROOT_FIX, OutsideRootError
from shardstore.store.manifest import FieldSpec, Manifest, Problem
from shardstore.store.snapshot import manifest_path, write_manifest

log = logging.getLogger(__name__)


@dataclass
class BuildReport:
    """What a build found: the manifest, the shards left out and why, and how much was actually read."""

    manifest: Manifest
    path: Path | None
    #: files whose first page (the ``.npy`` header) was read: new and changed shards, one spot check per field
    headers_read: int = 0
    #: files with the size and mtime the previous manifest recorded (their row, or their checksum, carried over)
    files_reused: int = 0
    files_checksummed: int = 0
    #: files and shard directories of the previous table compared with the disk (one ``stat`` each)
    paths_compared: int = 0
    #: nothing differed from the previous manifest: manifest.json and its table were left untouched
    unchanged: bool = False
    ignored_fields: dict[str, int] = field(default_factory=dict)
    #: shards that are used without (part of) a field group, and why: missing or bad files of the group
    incomplete_groups: list[Problem] = field(default_factory=list)
    #: files whose content no longer matches the checksum recorded for them; the old checksum is kept
    changed: list[Problem] = field(default_factory=list)

    @property
    def problems(self) -> list[Problem]:
        """The shards left out, one line each."""
        return self.manifest.left_out


def build_manifest(
    root: str | os.PathLike[str],
    *,
    checksum: bool = False,
    incremental: bool = True,
    write: bool = True,
    progress: Callable[[int], None] | None = None,
) -> BuildReport:
    """Discover and validate the shards under ``root`` and write its manifest (a new snapshot) atomically.

    Incremental (the default), the previous format-3 table is trusted for every shard whose
    files all have the size and mtime it records (one ``stat`` each, compared with its columns
    in NumPy): their rows are copied. Only new and changed shards are read (their ``.npy``
    headers, a page per file), with every check a full build makes, plus the header of one
    shard per field, which must agree with the table (dtype, per-sample shape, rows, data
    offset); if it does not, or the table fails ``check_columns(full=True)``, every header is
    read again (with a warning). When nothing differs, ``manifest.json`` and its table are
    left untouched and ``report.unchanged`` is set.

    What this trusts: a table edited consistently (offsets and row counts that still add up
    to each file's size, ids in order) for shards whose files are unchanged is kept as it is
    by an incremental build; ``incremental=False`` (``build-manifest --full``) reads every
    header and ignores the previous table and its checksums (with ``checksum`` the new
    content is recorded instead). A file added by hand to an existing shard directory under
    a name that is neither a field of the table nor of a declared group is seen only by a
    full build. A format 1 or 2 manifest lends sizes, mtimes and checksums; the build reads
    every header and writes format 3.

    A changed file with a recorded checksum is hashed again and, if its content differs,
    keeps the old checksum and is listed in ``report.changed`` (``verify`` then fails on it).
    Bad shards are left out and listed in ``report.problems``; a cache that is still growing
    is normal. With ``checksum`` every file without a checksum is hashed (``progress`` gets
    bytes). Temporaries of earlier manifest writers that were killed are removed.
    """
    root = Path(root)
    if not root.exists():
        raise ManifestError(f"{root} does not exist; pass the directory that holds the shards")
    if not root.is_dir():
        raise ManifestError(f"{root} is not a directory; pass the directory that holds the shards")
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return _Build(root, root_fd, previous_manifest(root), incremental).run(checksum, write, progress)
    finally:
        os.close(root_fd)


class _Build:
    """One build: the previous manifest, the root's listing, and the shards read so far."""

    def __init__(self, root: Path, root_fd: int, previous: Previous, incremental: bool) -> None:
        self.root = root
        self.root_fd = root_fd
        self.previous = previous
        self.incremental = incremental
        self.generation = previous.generation + 1
        self.entries = list_root(root)
        # Hidden names and declarations, found in one pass over the listing (a cache root may hold 10^6 names).
        special = [e.name for e in self.entries if e.name[0] == "." or e.name.endswith(".json")]
        self.stale_manifest_temporaries = any(n.startswith(f".{MANIFEST_NAME}.tmp-") for n in special)
        groups = read_group_specs(root) if any(n.endswith(".fields.json") for n in special) else {}
        self.groups = groups
        self.group_specs = {n: FieldSpec(d, s, g.name) for g in groups.values() for n, (d, s) in g.fields.items()}
        self.scan = Scan(root, root_fd, previous.lend if incremental else None)
        self.report = BuildReport(Manifest({}, []), None)
        self._journal: Journal | None = None
        self._journal_dirs = 0
        self.shards = ShardsRead(groups)
        self.read_ids: set[int] = set()
        self.problems: list[Problem] = []
        self.discovered: set[tuple] = set()

    def journal(self, num_dirs: int) -> Journal | None:
        """The writers' journal, if it saves listing ``num_dirs`` directories (``--full`` lists them all)."""
        if not self.incremental or not num_dirs:
            return None
        if self._journal is None or (not len(self._journal) and num_dirs > self._journal_dirs):
            self._journal = read_journal(self.root_fd, num_dirs)
            self._journal_dirs = num_dirs
        return self._journal

    # -- the steps ---------------------------------------------------------------------------

    def run(self, checksum: bool, write: bool, progress: Callable[[int], None] | None) -> BuildReport:
        base = self._base()
        keep = np.zeros(0, bool)
        if base is not None:
            changes = find_changes(self.root_fd, base, self.group_specs, self.entries)
            self.report.paths_compared = changes.stats
            keep = changes.keep
            if keep.any() and not self._spot_check(base, keep):
                base = None
            else:
                self._discover_and_read(changes.entries)
        if base is None:
            keep = np.zeros(0, bool)
            self._discover_and_read(self.entries)
        kept = int(keep.sum())
        if not kept and not self.read_ids and not self.problems:
            raise ManifestError(
                f"no shards in {self.root}; expected shard_<id>/<field>.npy directories or <field>_<id>.npy files"
            )
        specs, ignored = majority_specs(self.shards, kept, base)
        if base is not None and kept and specs != own(base.fields):
            log.info("the shards read change the cache's fields (%s); every header is read",
                     ", ".join(f"{n} {s.describe()}" for n, s in specs.items()))
            base, keep, kept = None, np.zeros(0, bool), 0
            self._discover_and_read(self.entries)
            specs, ignored = majority_specs(self.shards, 0, None)
        self.report.ignored_fields = ignored
        if self.shards.any_good() and not specs:
            raise ManifestError(f"the shards in {self.root} hold only fields of declared groups "
                                f"({', '.join(sorted(self.groups))}); a cache needs its own fields (e.g. images) "
                                "besides the groups added to it")
        specs |= self.group_specs
        rows = fill_rows(self.shards, specs, self.report.incomplete_groups)
        problems = self.problems + self.shards.left_out()
        self._report_changed()
        if base is not None and kept:
            self.report.files_reused += int(sum((base.has(n) & keep).sum() for n in base.fields))
        cols, manifest_unchanged = self._table(specs, base, keep, rows)
        if checksum:
            cols = self._add_checksums(specs, cols, problems, progress)
            manifest_unchanged = manifest_unchanged and not self.report.files_checksummed
        problems.sort(key=lambda p: (p.shard_id if p.shard_id is not None else -1, p.path))
        if manifest_unchanged and base is not None and problems == base.left_out:
            self.report.manifest = base
            self.report.unchanged = True
            self.report.path = manifest_path(self.root) if write else None
            self._remove_stale_temporaries(write)
            return self.report
        self.report.manifest = Manifest(specs, columns=cols, left_out=problems, generation=self.generation)
        if write and self.report.manifest.num_shards:
            self._remove_stale_temporaries(write)
            self.report.path = write_manifest(self.root, self.report.manifest)
        return self.report

    def _base(self) -> Manifest | None:
        """The previous table if this build may copy its unchanged rows (and the declared groups agree with it)."""
        prev = self.previous
        if not self.incremental or not prev.trusted or prev.manifest is None:
            return None
        base = prev.manifest
        for name, spec in base.fields.items():
            declared = self.group_specs.get(name)
            if (declared != spec) if spec.group is not None else (declared is not None):
                log.info("field %r is declared differently than when the manifest was built; every header is read",
                         name)
                return None
        return base

    def _spot_check(self, base: Manifest, keep: np.ndarray) -> bool:
        """Read one kept shard's file per field: its header must say what the table says, else the table is not used."""
        c = base.columns
        for name, spec in base.fields.items():
            rows = np.flatnonzero(keep & base.has(name))
            if not rows.size:
                continue
            p = int(rows[0])
            rel = base.file_path(p, name)
            info = self.scan.read(rel, int(c["id"][p]), name, lend=False)
            self.scan.label_ranges()
            table = (spec.dtype, (int(c["samples"][p]), *spec.shape), int(c[f"{name}.offset"][p]),
                     base.file_bytes(p, name), int(c[f"{name}.mtime_ns"][p]))
            if isinstance(info, FileInfo):
                found = (info.dtype, info.shape, info.header.data_offset, info.size, info.mtime_ns)
                recorded = base.value_range(p, name)
                if found == table and (recorded is None or recorded == info.value_range):
                    continue
                what = f"{info.dtype}{list(info.shape)} at offset {info.header.data_offset}"
            else:
                what = f"{info}" if info is not None else "gone"
            log.warning("%s: the manifest's table says %s%s at offset %d, the file holds %s; every header is read "
                        "again", rel, spec.dtype, list(table[1]), table[2], what)
            return False
        return True

    def _discover_and_read(self, entries: list) -> None:
        """Discover the shards among ``entries`` and read those not read yet."""
        if not entries:
            return
        num_dirs = sum(1 for e in entries if e.name.startswith("shard_"))

        def careful(cand: Candidate, pre: Preread) -> None:
            self.shards.one_by_one[cand.id] = self._read_shard(cand, pre)

        # The shards found whole are read (and sorted) while discovery goes on; those read by an earlier pass are not.
        with _without_cyclic_gc(), Reader(self.scan, set(self.group_specs), careful, skip=self.read_ids) as reader:
            candidates, problems = discover_shards(self.root, entries, journal=self.journal(num_dirs),
                                                   root_fd=self.root_fd, whole=reader.add, pool=reader.pool)
            for p in problems:
                key = (p.shard_id, p.path)
                if key not in self.discovered:
                    self.discovered.add(key)
                    self.problems.append(p)
            if self.read_ids:
                todo = [c for i, c in candidates.items() if i not in self.read_ids]
            else:
                todo = list(candidates.values())
            self.read_ids.update(candidates if len(todo) == len(candidates) else (c.id for c in todo))
            sigs = self.shards.signatures
            for key, sig in reader.finish(todo).items():
                if key in sigs:  # read by an earlier pass: the same headers
                    sigs[key].absorb(sig)
                else:
                    sigs[key] = sig
        self.scan.label_ranges()

    def _read_shard(self, cand: Candidate, pre: Preread | None = None) -> Read | Problem:
        """Read one shard file by file (what was read of it already is ``pre``), naming the first problem."""
        shard_id = cand.id
        files: dict[str, FileInfo] = {}
        extra: dict[str, FileInfo | str] = {}
        for name, rel in sorted(cand.files.items()):
            got = pre.get(name) if pre is not None else None
            if got is None:
                result = self.scan.read(rel, shard_id, name)
            else:
                result = self.scan.examine(rel, shard_id, name, *got)
            if isinstance(result, OutsideRootError):
                if name in self.group_specs:
                    result = f"resolves to {result.real}, outside the cache root; {OUTSIDE_ROOT_FIX}"
                else:  # as discovery names a link it finds while listing
                    return Problem(cand.where if cand.layout == "native" else rel, f"{result}; {LEFT_OUT}", shard_id)
            if name in self.group_specs:  # a missing or bad group file costs the shard the group, not its place
                if result is not None:
                    extra[name] = result
                continue
            if result is None:  # deleted between listing and reading: the cache is changing, not corrupt
                return Problem(rel, f"vanished while the manifest was built; {LEFT_OUT}", shard_id)
            if isinstance(result, str):
                return Problem(rel, f"{result}; {LEFT_OUT}", shard_id)
            files[name] = result
        lengths = {name: info.header.shape[0] for name, info in files.items()}
        if len(set(lengths.values())) > 1:
            short = min(lengths, key=lengths.__getitem__)
            long = max(lengths, key=lengths.__getitem__)
            return Problem(files[short].rel, f"{lengths[short]:,} samples, but {files[long].rel} has {lengths[long]:,} "
                                             f"(fields of unequal length); {LEFT_OUT}", shard_id)
        names = sorted(cand.files.values()) if cand.layout == "flat" else []
        odd = next((r for r in names if digits(r, "flat") != digits(names[0], "flat")), None)
        if odd is not None:
            return Problem(odd, f"its id is written with {digits(odd, 'flat')} digits, {names[0]} with "
                                f"{digits(names[0], 'flat')}; rename one so a shard's files share one width; "
                                f"{LEFT_OUT}", shard_id)
        return cand, files, extra

    def _table(self, specs: dict[str, FieldSpec], base: Manifest | None, keep: np.ndarray, rows: Rows
               ) -> tuple[dict[str, np.ndarray], bool]:
        """The new table: kept rows of ``base`` merged with ``rows``; and whether it is ``base``'s table unchanged."""
        layout = column_dtypes(specs, _digests(base.columns if base is not None else {}) | rows.digests())
        new = rows.columns(layout, self.previous.since(np.asarray(rows.ids, np.int64), self.generation))
        if len(rows.ids) > 1 and not bool((np.diff(new["id"]) > 0).all()):  # bulk and careful rows interleave
            new = take(new, np.argsort(new["id"], kind="stable"))
        if base is None or not keep.any():
            return new, False
        if bool(keep.all()) and not len(rows) and set(layout) == set(base.columns) and specs == base.fields:
            return base.columns, True  # nothing read produced a row: the table stays as it is
        return merge(kept_columns(base.columns, np.flatnonzero(keep), layout), new), False

    def _report_changed(self) -> None:
        fix = ("restore the file, or accept its new content with "
               f"`shardstore build-manifest --full --checksum {self.root}`")
        self.report.headers_read = self.scan.headers_read
        self.report.files_reused = self.scan.reused
        for rel, why in self.scan.changed:
            self.report.changed.append(Problem(rel, f"{why}; the recorded checksum is kept so `shardstore verify` "
                                                    f"fails until you {fix}"))

    def _add_checksums(self, specs: dict[str, FieldSpec], cols: dict[str, np.ndarray], problems: list[Problem],
                       progress: Callable[[int], None] | None) -> dict[str, np.ndarray]:
        """Hash every listed file without a checksum; a shard with a file that cannot be hashed is left out."""
        m = Manifest(specs, columns=cols)
        todo = [(p, name) for name in specs for p in np.flatnonzero(m.has(name) & ~m.checksummed(name)).tolist()]
        if not todo:
            return cols
        layout = column_dtypes(specs, {n for _, n in todo} | _digests(cols))
        cols = {n: (cols[n] if n in cols else np.zeros((m.num_shards, *layout[n][1]), layout[n][0])) for n in layout}
        paths = {(p, name): self.root / m.file_path(p, name) for p, name in todo}
        digests = checksum_files(paths.values(), progress=progress, resolved_root=os.path.realpath(self.root))
        self.report.files_checksummed = len(todo)
        drop = np.zeros(m.num_shards, bool)
        for (p, name), path in paths.items():
            digest = digests[path]
            if drop[p]:
                continue
            rel = m.file_path(p, name)
            shard_id = int(cols["id"][p])
            if isinstance(digest, OutsideRootError):
                problems.append(Problem(rel, f"resolves to {digest.real}, outside the cache root; {OUTSIDE_ROOT_FIX}; "
                                             f"{LEFT_OUT}", shard_id))
                drop[p] = True
            elif isinstance(digest, OSError):
                problems.append(Problem(rel, f"cannot be read ({one_line(digest)}); {LEFT_OUT}", shard_id))
                drop[p] = True
            else:
                cols[f"{name}.sha256"][p] = np.frombuffer(bytes.fromhex(digest.split(":", 1)[1]), np.uint8)
        return take(cols, ~drop) if drop.any() else cols

    def _remove_stale_temporaries(self, write: bool) -> None:
        # The root was listed already: only a root holding such a temporary is listed again to remove it.
        if write and self.stale_manifest_temporaries:
            remove_stale_temporaries(self.root, MANIFEST_NAME)


@contextmanager
def _without_cyclic_gc() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while a build discovers and reads its shards.

    That takes about ten new objects per shard, all kept until the table is made; the collector
    would walk the growing heap again and again (measured: an eighth of the main thread's time
    in a build of 10^5 shards). Reference counting still frees everything; a cycle made meanwhile
    waits for the next collection.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _digests(columns: dict[str, np.ndarray]) -> set[str]:
    """Fields with a checksum column."""
    return {n.rsplit(".", 1)[0] for n in columns if n.endswith(".sha256")}
