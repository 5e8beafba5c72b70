"""The object clients: ``open_client(url)`` gives a ``FileClient`` for ``file://`` and an ``ObstoreClient`` otherwise.

Both only translate: each call is one request, and each failure becomes one of the errors of
``shardstore.remote.objects`` with a one-line message naming the object's URL. Neither retries: callers wrap
calls in ``retry.call_with_retries`` (and ``gate.NodeGate.slot``), the one place that decides how often to try
again. Both are thread-safe and picklable (an unpickled client reopens from its URL and options).

The clients live in ``file_client`` (``FileClient``, ``check_key``, ``file_etag``) and ``obstore_client``
(``ObstoreClient``, ``classify_error``); this module re-exports those names so that imports from
``shardstore.remote.clients`` keep working.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shardstore.errors import ConfigError
from shardstore.remote.file_client import FileClient, check_key, file_etag
from shardstore.remote.objects import ObjectClient
from shardstore.remote.obstore_client import ObstoreClient, classify_error
from shardstore.remote.url import split_url

__all__ = ["FileClient", "ObstoreClient", "check_key", "classify_error", "file_etag", "open_client"]


def open_client(url: str, storage_options: Mapping[str, Any] | None = None) -> ObjectClient:
    """A client for the root ``url`` (``s3://``, ``gs://``, ``az://`` or ``file://``).

    ``storage_options`` go to the object store as they are (``{"endpoint": ..., "region": ...,
    "access_key_id": ...}``; see ``ObstoreClient``); a ``file://`` root takes none.
    """
    scheme, _, path = split_url(url)
    if scheme == "file":
        if storage_options:
            raise ConfigError(f"{url}: a file:// root takes no storage options, got {sorted(storage_options)}; "
                              f"remove them")
        return FileClient(path)
    return ObstoreClient(url, storage_options)
