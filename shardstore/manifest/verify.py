"""``verify_checksums``: read every file of a manifest again, check header and hash, report what no longer matches."""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from shardstore.manifest.checksum import fd_checksum
from shardstore.store.layout import OUTSIDE_ROOT_FIX, OutsideRootError, open_within
from shardstore.store.manifest import FieldSpec, FileEntry, Manifest, Problem, ShardEntry
from shardstore.store.npy import read_head_fd, read_header_bytes


@dataclass
class VerifyReport:
    """Files checked, and those that mismatched, vanished or were never checksummed."""

    checked: int = 0
    bytes: int = 0
    mismatches: list[Problem] = field(default_factory=list)
    without_checksum: int = 0

    @property
    def ok(self) -> bool:
        return not self.mismatches


def _check_file(resolved_root: str, root: Path, entry: FileEntry, spec: FieldSpec, num_samples: int,
                progress: Callable[[int], None] | None) -> str | None:
    """Why ``entry`` no longer matches its file (header, then checksum), or None; nothing outside the root is read."""
    try:
        fd = open_within(resolved_root, root / entry.path, entry.path)
    except OutsideRootError as exc:
        return f"resolves to {exc.real}, outside the cache root (not read); {OUTSIDE_ROOT_FIX}"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    fix = f"rebuild the manifest with `shardstore build-manifest {root}`"
    try:
        head, st = read_head_fd(fd)
        try:
            header = read_header_bytes(head)
        except Exception as exc:  # noqa: BLE001 - foreign bytes: any parse failure is a mismatch, never a crash
            return f"header no longer readable ({' '.join(str(exc).split())})"
        want = (spec.dtype, (num_samples, *spec.shape), entry.data_offset)
        got = (header.dtype, header.shape, header.data_offset)
        if got != want or st.st_size != entry.bytes:
            return (f"file holds {header.dtype}{list(header.shape)} at offset {header.data_offset} in {st.st_size:,} "
                    f"bytes, the manifest says {spec.dtype}{[num_samples, *spec.shape]} at offset "
                    f"{entry.data_offset} in {entry.bytes:,}; {fix}")
        if entry.checksum is None:
            return None
        got_sum = fd_checksum(fd, progress)
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    finally:
        os.close(fd)
    if got_sum != entry.checksum:
        return f"checksum mismatch (manifest {entry.checksum[:23]}..., file {got_sum[:23]}...)"
    return None


def verify_checksums(
    root: str | os.PathLike[str], manifest: Manifest, *, progress: Callable[[int], None] | None = None,
    workers: int | None = None,
) -> VerifyReport:
    """Check every file of ``manifest`` against its header and, where it has one, its checksum.

    Each file goes through the same inside-the-root check as every other reader, so a
    symlink out of the cache is reported, never followed.
    """
    root = Path(root)
    resolved_root = os.path.realpath(root)
    report = VerifyReport()
    todo = [(name, f, s) for s in manifest.shards for name, f in s.files.items()]
    report.without_checksum = sum(f.checksum is None for _, f, _ in todo)

    def one(item: tuple[str, FileEntry, ShardEntry]) -> str | None:
        name, entry, shard = item
        return _check_file(resolved_root, root, entry, manifest.fields[name], shard.num_samples, progress)

    with ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1)) as pool:
        results = list(pool.map(one, todo))
    for (_, entry, shard), why in zip(todo, results):
        if entry.checksum is not None:
            report.checked += 1
            report.bytes += entry.bytes
        if why is not None:
            report.mismatches.append(Problem(entry.path, why, shard.id))
    return report
