"""``shardstore ...``: a thin typer front end over the library; user errors end in one line and exit code 2.

The application and its consoles are in ``cli/app.py``, each group of commands in its own module, progress display
in ``cli/progress.py``; here: which commands exist and ``main``, which turns errors into one line.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer

# The manifest commands first: `shardstore --help` lists commands in the order they are registered.
from shardstore.cli import manifest as _manifest_commands  # noqa: F401  (registers build-manifest, info, verify)
from shardstore.cli.app import app, err, out  # noqa: F401  (re-exported: `from shardstore.cli import app`)

# isort: split
from shardstore.cli import coverage as _coverage_commands  # noqa: F401  (registers coverage)
from shardstore.cli import teacher as _teacher_commands  # noqa: F401  (registers cache-teacher)
from shardstore.cli import train as _train_commands  # noqa: F401  (registers train, plot and demo)
from shardstore.cli import write as _write_commands  # noqa: F401  (registers write)
from shardstore.errors import ShardstoreError
from shardstore.store.atomic import disk_full_error, is_disk_full


def _fail(message: str | ShardstoreError) -> int:
    """Exit code 2 after one line on stderr per problem (a config checked whole may have several)."""
    problems = getattr(message, "problems", None) or (str(message),)
    for problem in problems:
        sys.stderr.write(f"shardstore: error: {' '.join(problem.split())}\n")
    return 2


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
