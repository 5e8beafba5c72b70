"""What every object-store client offers (``ObjectClient``), what it reports, and the errors it raises.

Keys are always relative to the store's root URL (``s3://bucket/prefix`` + ``/`` + key), with ``/``
separators. A client is thread-safe and is never used in a forked DataLoader worker.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from shardstore.errors import ShardstoreError


@dataclass(frozen=True)
class ObjectInfo:
    """One object: its key under the root, its size in bytes, and what identifies this version of it."""

    key: str
    size: int
    etag: str | None = None        # changes whenever the object is replaced; sent back as If-Match
    version: str | None = None     # the store's version id, where it keeps versions
    mtime_ns: int | None = None    # last-modified time, where the listing or HEAD gives one


class RemoteError(ShardstoreError):
    """An object could not be read or written; the message names the object, the attempts and the last cause."""


class ObjectNotFound(RemoteError):
    """The object does not exist (HTTP 404): never retried."""


class ObjectChanged(RemoteError):
    """The object was replaced while it was being read (its ETag no longer matches: HTTP 412)."""


class TransientRemoteError(RemoteError):
    """A failure worth retrying: a timeout, a reset connection, a truncated body, 5xx or 503 SlowDown."""


class ObjectClient(Protocol):
    """The few calls the shard cache and the manifest need from an object store."""

    url: str  # the root URL, e.g. ``s3://bucket/prefix`` (no trailing slash)

    def head(self, key: str) -> ObjectInfo:
        """Size and ETag of ``key``; ``ObjectNotFound`` if it does not exist."""

    def get_range(self, key: str, start: int, end: int, *, if_match: str | None = None) -> bytes:
        """Bytes ``[start, end)`` of ``key``. With ``if_match``, ``ObjectChanged`` if its ETag differs.

        A body shorter than asked is a ``TransientRemoteError`` (truncated), never returned.
        """

    def get(self, key: str) -> bytes:
        """The whole object."""

    def put(self, key: str, data: bytes) -> None:
        """Write the whole object in one request: readers see the old object or the new one, never a part."""

    def delete(self, key: str) -> None:
        """Remove ``key``; no error if it is already gone."""

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix`` (recursively), in key order."""
