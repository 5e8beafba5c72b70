"""The exception family that user-caused errors belong to; the CLI turns them into one line and exit code 2."""

from __future__ import annotations


class ShardstoreError(Exception):
    """Base of every error a user can cause and fix; its message is one line that names the fix."""


class ConfigError(ShardstoreError):
    """A configuration file, key or value is wrong.

    Config files are checked whole: ``problems`` holds one complete line per problem found (usually one), and
    the message is those lines joined, so a user porting a config learns every foreign key in one run.
    """

    def __init__(self, *problems: str) -> None:
        super().__init__("\n".join(problems))
        self.problems: tuple[str, ...] = problems or ("configuration error",)


class ManifestError(ShardstoreError):
    """The manifest is missing, unreadable, or no longer matches the files on disk."""


class CorruptShardError(ShardstoreError):
    """A shard file is truncated, unreadable, or disagrees with the rest of the cache."""


class WriterError(ShardstoreError):
    """A shard writer was given inconsistent samples or a shard range that is already used."""


class DiskFullError(ShardstoreError):
    """A write ran out of space; the message names the path and the space it needed. Nothing was replaced."""
