"""``shardstore ...``: a thin typer front end over the library; user errors end in one line and exit code 2."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

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
from rich.text import Text

from shardstore import __version__
from shardstore.errors import ShardstoreError
from shardstore.store.atomic import disk_full_error, is_disk_full

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


# The manifest commands first: `shardstore --help` lists commands in the order they are registered.
from shardstore.cli import manifest as _manifest_commands  # noqa: E402,F401  (registers build-manifest, info, verify)

# isort: split
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
