"""The ``shardstore`` typer application, its consoles and its global options; each command module registers on it."""

from __future__ import annotations

import logging
import sys
from typing import Annotated

import typer
from rich.console import Console

from shardstore import __version__

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
