"""``shardstore ...``: a thin typer front end over the library; user errors end in one line and exit code 2."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from shardstore import __version__
from shardstore.errors import ManifestError, ShardstoreError
from shardstore.manifest.build import build_manifest
from shardstore.manifest.verify import verify_checksums
from shardstore.store.atomic import disk_full_error, is_disk_full
from shardstore.store.groups import read_group_specs
from shardstore.store.manifest import Manifest
from shardstore.store.reader import load_manifest
from shardstore.store.snapshot import manifest_path

app = typer.Typer(
    name="shardstore",
    help="Shard-level random epochs over a memory-mapped tensor cache: write a cache, build its manifest, "
         "train a student by distillation from it.",
    add_completion=False,
    # `shardstore` alone prints the help (see main); -h works everywhere --help does.
    context_settings={"help_option_names": ["-h", "--help"]},
    # Plain help, as click writes it: a flag reads `--checksum`, never `--checksum <bool>` (rich mode's rendering),
    # and the text stays readable in a log file or a narrow terminal.
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)
# Piped or logged output gets room for the wider tables (rich would assume 80 columns). Markup and emoji codes
# are off: the text printed holds the user's paths and names, and `[b]` or `:x:` in a path must print as written.
out = Console(soft_wrap=True, highlight=False, markup=False, emoji=False, width=None if sys.stdout.isatty() else 120)
err = Console(stderr=True, soft_wrap=True, highlight=False, markup=False, emoji=False)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1000
    return str(n)


class _RateColumn(ProgressColumn):
    """Items per second, e.g. ``1,234 images/s``."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        return Text(f"{task.speed or 0:,.0f} {self.unit}/s")


class _Advance:
    """``advance(n)`` for a library's progress callback; ``advance.set_total(n)`` when the total is known late."""

    def __init__(self, bar: Progress, task: Any) -> None:
        self.bar, self.task = bar, task

    def __call__(self, n: int) -> None:
        self.bar.advance(self.task, n)

    def set_total(self, total: int) -> None:
        self.bar.update(self.task, total=total)


@contextmanager
def _progress(description: str, total: int | None, *, bytes_: bool = False, rate: str | None = None,
              hidden: bool = False) -> Iterator[_Advance]:
    """A rich progress bar on stderr; yields ``advance(n)``. Hidden when stderr is not a terminal (or ``hidden``)."""
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn() if not bytes_ else
               TransferSpeedColumn(), *([_RateColumn(rate)] if rate else []), TimeRemainingColumn()]
    with Progress(*columns, console=err, transient=True, disable=hidden or not err.is_terminal) as bar:
        yield _Advance(bar, bar.add_task(description, total=total))


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
    table.add_row("bytes", _fmt_bytes(manifest.total_bytes))
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
    with _progress("checksums", None, bytes_=True) as advance:
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
    with _progress("verifying", total, bytes_=True) as advance:
        report = verify_checksums(path, manifest, progress=advance)
    for problem in report.mismatches:
        err.print(f"mismatch: {problem}", markup=False)
    note = f", {report.without_checksum:,} files without a checksum" if report.without_checksum else ""
    out.print(f"checked {report.checked:,} files ({_fmt_bytes(report.bytes)}): {len(report.mismatches)} bad{note}")
    if report.mismatches:
        raise typer.Exit(1)


def _print_version(value: bool) -> None:
    if value:
        out.print(f"shardstore {__version__}", markup=False)
        raise typer.Exit()


@app.callback()
def _options(
    debug: Annotated[bool, typer.Option("--debug", help="Show the traceback of an error instead of its one line.")
                     ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what the library does (INFO: shards read, "
                                          "threads chosen, checkpoints written) on stderr.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Options before the command apply to every command: `shardstore -v train ...`."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


def _fail(message: str | ShardstoreError) -> int:
    """Exit code 2 after one line on stderr per problem (a config checked whole may have several)."""
    problems = getattr(message, "problems", None) or (str(message),)
    for problem in problems:
        sys.stderr.write(f"shardstore: error: {' '.join(problem.split())}\n")
    return 2


from shardstore.cli import coverage as _coverage_commands  # noqa: E402,F401  (registers coverage)
from shardstore.cli import teacher as _teacher_commands  # noqa: E402,F401  (registers cache-teacher)
from shardstore.cli import train as _train_commands  # noqa: E402,F401  (registers train, plot and demo)
from shardstore.cli import write as _write_commands  # noqa: E402,F401  (registers write)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the command, turning user errors into one line on stderr and exit code 2."""
    args = sys.argv[1:] if argv is None else argv
    if not args:
        args = ["--help"]  # `shardstore` alone: the help and exit code 0, not a usage error
    debug = "--debug" in args
    command = typer.main.get_command(app)
    misuse = _flag_given_a_value(command, args)
    if misuse is not None:
        return _fail(misuse)
    try:
        # Without standalone mode click returns the code of a typer.Exit instead of exiting.
        code = command.main(args=args, prog_name="shardstore", standalone_mode=False)
    except typer.Exit as exc:
        return exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        return _fail("interrupted")
    except ShardstoreError as exc:
        if debug:
            raise
        return _fail(exc)
    except Exception as exc:
        full = _disk_full(exc)
        if full is not None and not debug:
            return _fail(full)
        if not _is_usage_error(exc):
            raise
        ctx = getattr(exc, "ctx", None)
        where = ctx.command_path if ctx is not None else "shardstore"
        return _fail(f"{exc.format_message()} (see `{where} --help`)")
    return code if isinstance(code, int) else 0


_BOOL_WORDS = {"true", "false", "yes", "no", "on", "off", "1", "0"}


def _flag_given_a_value(group: Any, args: list[str]) -> str | None:
    """The one line for ``--checksum true``: a flag takes no value (click would say the root is an extra argument)."""
    name = next((a for a in args if not a.startswith("-")), None)
    command = getattr(group, "commands", {}).get(name)
    if command is None:
        return None
    flags = {opt: param for param in command.params if getattr(param, "is_flag", False)
             for opt in (*param.opts, *param.secondary_opts)}
    for flag, value in zip(args, args[1:]):
        if flag in flags and value.lower() in _BOOL_WORDS and not Path(value).exists():  # (a folder named 1 is a root)
            param = flags[flag]
            on, off = param.opts[0], (param.secondary_opts or [None])[0]
            how = f"`{on}` to turn it on" + (f", `{off}` to turn it off" if off else ", nothing to leave it off")
            return (f"{flag} is a flag and takes no value (got `{flag} {value}`); write {how} "
                    f"(see `shardstore {name} -h`)")
    return None


def _disk_full(exc: BaseException) -> str | None:
    """The one line for a full disk anywhere in ``exc``'s chain of causes (a safety net: writers say it themselves)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if is_disk_full(current):
            assert isinstance(current, OSError)
            if current.filename is not None:
                return str(disk_full_error(current.filename, None))
            return (f"no space left on device ({current.strerror or current}); free space on the file system "
                    "being written (or choose another directory) and run again")
        current = current.__cause__ or current.__context__
    return None


def _is_usage_error(exc: Exception) -> bool:
    """Click's usage errors (bad flag, missing argument), whether typer vendors click or not."""
    return callable(getattr(exc, "format_message", None)) and isinstance(getattr(exc, "exit_code", None), int)


if __name__ == "__main__":
    sys.exit(main())
