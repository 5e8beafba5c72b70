"""``build_remote_manifest``: the manifest of a cache in object storage, built on a local mirror of its headers.

A cache written locally and copied to a bucket by ordinary tools (``aws s3 sync``) becomes
readable without copying it back. The objects are listed; the mirror (``remote_mirror``) brings
each shard file's header, the bucket's current manifest and the group declarations into a local
directory of sparse files, and the local ``build_manifest`` runs on it with every check it makes on
a disk (truncated files, bad headers, fields of unequal length, dtypes that differ), incrementally
against the bucket's own table.

Then the new table is uploaded as new objects ``manifest.d/<snapshot>-<nonce>/<column>.npy``,
every one of them before ``manifest.json`` (one PUT replaces it whole): a reader sees the old
header or the new one, each with its whole table. The table the old header named is kept (a
reader may have fetched that header a moment ago); older tables are deleted, only their column
files by name, never another object.

``--checksum`` is refused: it would download every object. (A file whose checksum the bucket's
table records and whose object changed is still hashed, as on a disk: see ``remote_mirror``.)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path

from shardstore.errors import ManifestError
from shardstore.manifest.build import BuildReport, build_manifest
from shardstore.manifest.remote_mirror import (
    _TABLE_OBJECT,
    REQUEST_THREADS,
    _locked,
    _Mirror,
    _Remote,
    _table_name,
    default_mirror_dir,
)
from shardstore.remote.objects import ObjectClient, ObjectInfo
from shardstore.store.layout import MANIFEST_NAME
from shardstore.store.snapshot import TABLE_DIR


@dataclass
class RemoteBuildReport(BuildReport):
    """A ``BuildReport`` for a cache in object storage, with the requests it took.

    ``headers_read`` counts the mirror files the build read; ``headers_fetched`` the objects
    whose first bytes were fetched. ``path`` is None: the manifest lives at ``manifest_url``.
    """

    url: str = ""
    manifest_url: str = ""
    #: objects whose first bytes were fetched with ranged GETs (new and changed shard files)
    headers_fetched: int = 0
    #: requests by kind (LIST, GET, PUT, DELETE, HEAD)
    requests: dict[str, int] = field(default_factory=dict)
    bytes_fetched: int = 0
    #: the mirror the build ran on
    mirror: Path | None = None


def build_remote_manifest(url: str, *, storage_options: dict[str, str] | None = None, full: bool = False,
                          checksum: bool = False, mirror_dir: str | os.PathLike[str] | None = None,
                          progress: Callable[[int], None] | None = None,
                          client: ObjectClient | None = None) -> RemoteBuildReport:
    """Build the manifest of the cache at ``url`` (``s3://``, ``gs://``, ``az://``, ``file://``) and upload it.

    Reads only headers with ranged GETs (see the module docstring); ``full`` is ``build-manifest
    --full``. ``mirror_dir`` overrides ``default_mirror_dir(url)``; ``progress`` is given the bytes
    of each GET as it completes; ``client`` replaces ``open_client(url, storage_options)``.
    Bad shards are left out and listed in ``report.problems`` as a local build lists them.
    """
    if checksum:
        raise ManifestError(f"--checksum is not available for a cache in object storage ({url}): it would download "
                            "every object; build without --checksum, or on a local copy of the cache")
    if client is None:
        from shardstore.remote.clients import open_client

        client = open_client(url, storage_options)
    remote = _Remote(client)
    directory = Path(mirror_dir) if mirror_dir is not None else default_mirror_dir(remote.url)
    with _locked(directory, remote.url):
        mirror = _Mirror(directory, remote, progress)
        listing = remote.list()
        previous_table = mirror.sync(listing)
        whole = [] if full else mirror.fetch_hashed()
        try:
            report = build_manifest(mirror.root, incremental=not full)
        except ManifestError as exc:
            raise ManifestError(str(exc).replace(str(mirror.root), remote.url)) from None
        finally:
            mirror.make_sparse(whole)
            mirror.finish()
        out = RemoteBuildReport(**{f.name: getattr(report, f.name) for f in fields(BuildReport)},
                                url=remote.url, manifest_url=f"{remote.url}/{MANIFEST_NAME}",
                                headers_fetched=mirror.headers_fetched, mirror=mirror.root)
        out.path = None
        if not report.unchanged and report.path is not None:
            _upload(remote, mirror.root, previous_table, listing)
        out.requests = dict(remote.requests)
        out.bytes_fetched = remote.bytes_fetched
        return out


def _upload(remote: _Remote, root: Path, previous_table: str | None, listing: list[ObjectInfo]) -> None:
    """Upload the mirror's new table, then its header; delete the tables older than the one it replaced."""
    header = (root / MANIFEST_NAME).read_bytes()
    name = _table_name(header)
    if name is None:  # written by build_manifest a moment ago
        raise ManifestError(f"{root / MANIFEST_NAME} names no table; run the build again")
    directory = root / TABLE_DIR / name
    columns = sorted(e.name for e in os.scandir(directory) if _TABLE_OBJECT.match(f"{TABLE_DIR}/{name}/{e.name}"))
    with ThreadPoolExecutor(REQUEST_THREADS, thread_name_prefix="shardstore-put") as pool:
        # (every column must be in place before the header that names it: map's results are waited for)
        list(pool.map(lambda c: remote.put(f"{TABLE_DIR}/{name}/{c}", (directory / c).read_bytes()), columns))
    remote.put(MANIFEST_NAME, header)
    keep = {name, previous_table}
    old = [i.key for i in listing if (m := _TABLE_OBJECT.match(i.key)) is not None and m.group(1) not in keep]
    if old:
        with ThreadPoolExecutor(REQUEST_THREADS, thread_name_prefix="shardstore-delete") as pool:
            list(pool.map(remote.delete, old))
