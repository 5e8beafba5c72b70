"""``verify_checksums``: hash every file of a manifest again and report those that no longer match."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from shardstore.manifest.checksum import checksum_files
from shardstore.manifest.model import Manifest, Problem


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


def verify_checksums(
    root: str | os.PathLike[str], manifest: Manifest, *, progress: Callable[[int], None] | None = None
) -> VerifyReport:
    """Recompute the checksum of every file that has one in ``manifest`` and compare."""
    root = Path(root)
    report = VerifyReport()
    expected = {}
    for shard in manifest.shards:
        for f in shard.files.values():
            if f.checksum is None:
                report.without_checksum += 1
            else:
                expected[root / f.path] = (f, shard.id)
    for path, got in checksum_files(expected, progress=progress).items():
        entry, shard_id = expected[path]
        report.checked += 1
        report.bytes += entry.bytes
        if isinstance(got, OSError):
            report.mismatches.append(Problem(entry.path, f"cannot be read ({got.strerror or got})", shard_id))
        elif got != entry.checksum:
            report.mismatches.append(
                Problem(entry.path, f"checksum mismatch (manifest {entry.checksum[:23]}..., file {got[:23]}...)", shard_id)
            )
    return report
