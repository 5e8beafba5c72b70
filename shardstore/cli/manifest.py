"""``shardstore build-manifest``, ``info`` and ``verify``: a cache's manifest, written, summed up and checked."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.table import Table

from shardstore.cli.app import app, err, out
from shardstore.cli.progress import format_bytes, progress_bar
from shardstore.errors import ManifestError, ShardstoreError
from shardstore.manifest.build import build_manifest
from shardstore.manifest.verify import verify_checksums
from shardstore.store.groups import read_group_specs
from shardstore.store.manifest import Manifest
from shardstore.store.reader import load_manifest
from shardstore.store.snapshot import manifest_path


def print_summary(root: Path, manifest: Manifest) -> None:
    """The manifest summary: format, shards, samples, bytes, and each field's dtype, shape and bytes per sample."""
    n = manifest.num_shards
    table = Table(title=f"cache {root}", show_header=False, title_justify="left")
    if manifest.format_version >= 3:
        where = manifest.source[1] if manifest.source else ""
        table.add_row("format", f"{manifest.format_version} (JSON header + columnar table in manifest.d/{where}), "
                                f"generation {manifest.generation}")
    else:
        table.add_row("format", f"{manifest.format_version} (all JSON; the next `shardstore build-manifest` "
                                "converts it to format 3)")
    table.add_row("shards", f"{n:,}")
    table.add_row("samples", f"{manifest.num_samples:,}")
    table.add_row("bytes", format_bytes(manifest.total_bytes))
    table.add_row("left out", f"{len(manifest.left_out):,} shard(s)")
    checksummed = sum(int((manifest.checksummed(f) & manifest.has(f)).sum()) for f in manifest.fields)
    files = sum(int(manifest.has(f).sum()) for f in manifest.fields)
    table.add_row("checksums", f"{checksummed:,} of {files:,} files")
    layouts = np.bincount(np.asarray(manifest.columns["layout"]), minlength=2) if n else np.zeros(2, int)
    table.add_row("layout", ", ".join(f"{name} ({int(count):,})" for name, count in zip(("native", "flat"), layouts)
                                      if count))
    if n:
        table.add_row("shard ids", f"{int(manifest.ids[0])} .. {int(manifest.ids[-1])}")
    out.print(table)
    fields = Table("field", "dtype", "shape", "bytes/sample", "group", "shards", title_justify="left")
    for name, spec in manifest.fields.items():
        have = int(manifest.has(name).sum())
        fields.add_row(name, spec.dtype.name, str(list(spec.shape)), f"{spec.sample_bytes:,}", spec.group or "",
                       f"{have:,}" if have == n else f"{have:,} of {n:,}")
    base = sum(f.sample_bytes for f in manifest.fields.values() if f.group is None)
    fields.add_row("all own fields", "", "", f"{base:,}", "", "")
    for group in sorted({f.group for f in manifest.fields.values() if f.group}):
        extra = sum(f.sample_bytes for f in manifest.fields.values() if f.group == group)
        fields.add_row(f"group {group}", "", "", f"{extra:,}", group, "")
    out.print(fields)


def _root(root: str) -> Path:
    path = Path(root)
    if not path.exists():
        raise ShardstoreError(f"{path} does not exist; pass the cache directory")
    if not path.is_dir():
        raise ShardstoreError(f"{path} is not a directory; pass the cache directory")
    return path


@app.command("build-manifest", short_help="Discover and validate shards; write ROOT/manifest.json.")
def build_manifest_cmd(
    root: Annotated[str, typer.Argument(metavar="ROOT", help="Cache directory (native shard_<id>/ dirs or flat "
                                                             "<field>_<id>.npy files), or an object-store URL "
                                                             "(s3://, gs://, az://, file://).")],
    checksum: Annotated[bool, typer.Option("--checksum", help="Also hash every new file (SHA-256), for "
                                                              "`shardstore verify`.")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Exit 1 if any shard is left out or a checksummed file "
                                                          "changed.")] = False,
    full: Annotated[bool, typer.Option("--full", help="Start over, without the old manifest's entries and checksums "
                                                      "(add --checksum to record new ones).")] = False,
) -> None:
    """Discover and validate shards, then write ROOT/manifest.json atomically.

    Needs: a directory of shards, written by `shardstore write` or by hand with np.save
    (ROOT/shard_<id>/<field>.npy or ROOT/<field>_<id>.npy). Run it again whenever shards are added:
    unchanged shards are not read again. Bad shards are left out and listed, never fatal.
    A cache in object storage (e.g. after `aws s3 sync`) is read with ranged GETs of the .npy
    headers only, and its manifest is written back to the bucket (the table first, the header last).
    """
    if "://" in root:  # a cache in object storage: headers read with ranged GETs, the manifest written back
        from shardstore.manifest.remote_build import build_remote_manifest

        report = build_remote_manifest(root, full=full, checksum=checksum)
        _report_build(root, report, checksum, strict, where=report.manifest_url)
        return
    path = _root(root)
    with progress_bar("checksums", None, bytes_=True) as advance:
        report = build_manifest(path, checksum=checksum, incremental=not full, progress=advance if checksum else None)
    _report_build(path, report, checksum, strict, where=str(report.path))


def _report_build(path: Path | str, report: Any, checksum: bool, strict: bool, *, where: str) -> None:
    """What a build left out, changed and wrote; exit 1 under ``--strict`` when anything was left out or changed."""
    for problem in report.problems:
        err.print(f"left out: {problem}", markup=False)
    for name, count in report.ignored_fields.items():
        err.print(f"ignored field {name!r}: only {count} of the shards have it", markup=False)
    for problem in report.incomplete_groups:
        err.print(f"incomplete group: {problem}", markup=False)
    for problem in report.changed:
        err.print(f"changed: {problem}", markup=False)
    if not report.manifest.num_shards:
        raise ShardstoreError(f"no usable shards in {path} (every shard was left out, see above); fix them and rebuild")
    print_summary(path, report.manifest)
    what = f"unchanged: {where}" if report.unchanged else f"wrote {where}"
    out.print(
        f"{what} (headers read: {report.headers_read:,}, unchanged files reused: {report.files_reused:,}"
        + (f", checksummed: {report.files_checksummed:,}" if checksum else "") + ")",
        markup=False,
    )
    if strict and (report.problems or report.changed):
        raise typer.Exit(1)


@app.command(short_help="Print a cache's manifest summary (reads no shard).")
def info(root: Annotated[str, typer.Argument(metavar="ROOT", help="Cache directory holding manifest.json, or an "
                                             "object-store URL (s3://, gs://, az://, file://).")]) -> None:
    """Print the manifest summary of a cache: shards, samples, bytes, fields, groups.

    Needs: ROOT/manifest.json (run `shardstore build-manifest ROOT` first). Reads no shard.
    """
    if "://" in root:  # a cache in object storage: its header and table, fetched; no shard
        from shardstore.store.remote import read_remote_manifest

        manifest = read_remote_manifest(root)
        print_summary(root, manifest)  # type: ignore[arg-type]
        for problem in manifest.left_out:
            out.print(f"left out: {problem}", markup=False)
        return
    path = _root(root)
    manifest = load_manifest(path)
    print_summary(path, manifest)
    for name, group in read_group_specs(path).items():
        settings = []
        for key, value in group.meta.items():
            if isinstance(value, dict) and "name" in value:
                value = value["name"]  # e.g. the teacher, by name
            if key != "format" and isinstance(value, (str, int, float)):
                settings.append(f"{key}={value}")
        out.print(f"group {name} ({name}.fields.json): " + ", ".join(settings), markup=False)
    for problem in manifest.left_out:
        out.print(f"left out: {problem}", markup=False)


@app.command(short_help="Check every file against the manifest's checksums.")
def verify(root: Annotated[str, typer.Argument(metavar="ROOT", help="Cache directory holding manifest.json.")]) -> None:
    """Recompute every file's checksum and report the files that no longer match (exit 1).

    Needs: checksums recorded in the manifest by `shardstore build-manifest --checksum ROOT`
    (a manifest without any is refused with that hint). Reads every checksummed byte once.
    """
    path = _root(root)
    manifest = load_manifest(path, check="all")
    total = sum(int(manifest.file_sizes(f)[manifest.checksummed(f)].sum()) for f in manifest.fields)
    if total == 0 and manifest.num_shards:
        raise ManifestError(f"{manifest_path(path)} has no checksums; "
                            f"run `shardstore build-manifest --checksum {path}`")
    with progress_bar("verifying", total, bytes_=True) as advance:
        report = verify_checksums(path, manifest, progress=advance)
    for problem in report.mismatches:
        err.print(f"mismatch: {problem}", markup=False)
    note = f", {report.without_checksum:,} files without a checksum" if report.without_checksum else ""
    out.print(f"checked {report.checked:,} files ({format_bytes(report.bytes)}): {len(report.mismatches)} bad{note}")
    if report.mismatches:
        raise typer.Exit(1)
