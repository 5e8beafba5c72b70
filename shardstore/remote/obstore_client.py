"""``ObstoreClient``: S3, GCS and Azure objects through ``obstore``, and ``classify_error``, which maps its failures.

Like every object client it only translates: each call is one request, and each failure becomes one of the
errors of ``shardstore.remote.objects`` with a one-line message naming the object's URL; it never retries
(callers wrap calls in ``retry.call_with_retries`` and ``gate.NodeGate.slot``). ``obstore`` is imported
lazily, so this module imports without it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from datetime import datetime
from typing import Any

from shardstore.errors import ConfigError, ShardstoreError
from shardstore.remote.file_client import _check_range, check_key
from shardstore.remote.objects import (
    ObjectChanged,
    ObjectInfo,
    ObjectNotFound,
    RemoteError,
    TransientRemoteError,
)
from shardstore.remote.url import split_url

_STATUS = re.compile(r"status code: (\d{3})")
_XML_CODE = re.compile(r"<Code>([^<]*)</Code>")
_XML_MESSAGE = re.compile(r"<Message>([^<]*)</Message>")
# object_store's HttpErrorKind names of a failure on the way (not an answer from the store): worth retrying.
_TRANSIENT_KIND = re.compile(r"kind: (Connect|Timeout|Request|Interrupted|Decode|Body)\b")
_TRANSIENT_TEXT = re.compile(r"error sending request|timed out|connection (reset|closed|refused|aborted)|"
                             r"error decoding response body|unexpected EOF|end of file before message|"
                             r"Requested \d+\.\.\d+, got \d+\.\.\d+",  # a 206 shorter than asked (not at the end)
                             re.IGNORECASE)
_ENDPOINT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT")
_REMOTE_EXTRA = "pip install 'shardstore[remote]'"

# obstore runs its requests on one Tokio runtime per process, started by the first request. fork() copies
# only the calling thread, so in a child forked after that first request every obstore request, even through
# a store opened in the child, waits forever (measured with obstore 0.12: bench/remote_clients.py). Such a
# child gets an error instead of a hang; a child forked before any request, or spawned, works.
_requests_sent = False
_forked_after_requests = False


def _after_fork_in_child() -> None:
    global _forked_after_requests
    _forked_after_requests = _forked_after_requests or _requests_sent


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _summary(error: BaseException) -> str:
    """One line from an obstore error: the HTTP status, the store's code and message, or the first line."""
    text = str(error)
    status = _STATUS.search(text)
    code, message = _XML_CODE.search(text), _XML_MESSAGE.search(text)
    if status:
        parts = [f"HTTP {status.group(1)}"] + [m.group(1) for m in (code, message) if m]
        return " ".join(parts[:2]) + (f": {parts[2]}" if len(parts) > 2 else "")
    first = text.split("\n\nDebug source", 1)[0].strip().splitlines()
    line = first[0] if first else type(error).__name__
    kind = _TRANSIENT_KIND.search(text)
    return f"{line} ({kind.group(1).lower()})" if kind else line


def classify_error(error: BaseException, object_url: str, doing: str) -> RemoteError:
    """The ``RemoteError`` subclass an obstore (or OS) error from ``doing`` on ``object_url`` stands for."""
    import obstore.exceptions as obs_errors

    where = f"{doing} {object_url}"
    summary = _summary(error)
    text = str(error)
    status_match = _STATUS.search(text)
    status = int(status_match.group(1)) if status_match else None
    if isinstance(error, FileNotFoundError) or status == 404:
        return ObjectNotFound(f"{where}: not found ({summary}); check the URL, the bucket and the key")
    if isinstance(error, obs_errors.PreconditionError) or status == 412:
        return ObjectChanged(f"{where}: the object was replaced since it was listed ({summary}); list the "
                             f"objects again to read the new version")
    if isinstance(error, (obs_errors.PermissionDeniedError, obs_errors.UnauthenticatedError)) or status in (401, 403):
        return RemoteError(f"{where}: access denied ({summary}); check the credentials (AWS_ACCESS_KEY_ID, a role, "
                           f"or storage_options) and the bucket's policy")
    if status is not None:
        if status >= 500 or status in (408, 429):
            return TransientRemoteError(f"{where}: {summary}")
        return RemoteError(f"{where}: {summary}")
    if isinstance(error, (ConnectionError, TimeoutError)) or _TRANSIENT_KIND.search(text) \
            or _TRANSIENT_TEXT.search(text):
        return TransientRemoteError(f"{where}: {summary}")
    return RemoteError(f"{where}: {summary}")


def _meta_mtime_ns(meta: Mapping[str, Any]) -> int | None:
    modified = meta.get("last_modified")
    if isinstance(modified, datetime):
        return int(modified.timestamp()) * 10**9 + modified.microsecond * 1000
    return None


def _info(key: str, meta: Mapping[str, Any]) -> ObjectInfo:
    return ObjectInfo(key, int(meta["size"]), meta.get("e_tag"), meta.get("version"), _meta_mtime_ns(meta))


class ObstoreClient:
    """S3 (and S3-compatible), Google Cloud Storage and Azure Blob Storage through ``obstore`` (Rust ``object_store``).

    ``storage_options`` are obstore's store configuration, passed through (``endpoint``, ``region``,
    ``access_key_id``, ``secret_access_key``, ``token``, ``virtual_hosted_style_request``, ...), plus:
    ``client_options`` (a dict of obstore's HTTP client settings: ``timeout``, ``connect_timeout``, ...) and,
    for S3, ``profile`` (read credentials of that ``~/.aws`` profile through boto3).

    Endpoint: obstore itself reads ``AWS_ENDPOINT_URL`` (and ``AWS_ENDPOINT``, ``AWS_ENDPOINT_URL_S3``), as it
    reads every ``AWS_*`` variable. For an ``http://`` endpoint (MinIO, a test server) plain HTTP is allowed,
    and the region defaults to ``us-east-1`` when neither the options nor ``AWS_REGION`` /
    ``AWS_DEFAULT_REGION`` give one.

    Credentials: obstore's own chain — keys in the environment or the options, then web identity
    (``AWS_WEB_IDENTITY_TOKEN_FILE`` + ``AWS_ROLE_ARN``, as on EKS), ECS/EKS container credentials and EC2
    instance credentials (similarly for GCS and Azure). Credentials of the last three expire; obstore caches
    them and fetches new ones before they expire, by itself, so a weeks-long job needs nothing from us. Keys
    given as plain environment variables are static and are never refreshed. obstore does not read
    ``~/.aws/config`` profiles (SSO, ``credential_process``): give ``profile`` for those.

    Retries: obstore's own are off (``max_retries=0``): each call is one request, and its failure is mapped
    to ``ObjectNotFound`` (404), ``ObjectChanged`` (412 on If-Match), ``TransientRemoteError`` (5xx, 503
    SlowDown, 408/429, timeouts, connection errors, short bodies) or ``RemoteError`` (anything else), so that
    ``retry.call_with_retries`` is the only retry loop.

    The store object is thread-safe; the client pickles as its URL and options and reopens when unpickled
    (in a spawned worker, say). obstore cannot work in a process ``fork()``-ed after its parent sent a
    request (the Rust runtime's threads do not survive a fork): there every call raises ``ShardstoreError``
    at once instead of hanging.
    """

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        scheme, bucket, prefix = split_url(url)
        if scheme == "file":
            raise ShardstoreError(f"{url}: use FileClient (or open_client) for a file:// root")
        self.url = f"{scheme}://{bucket}" + (f"/{prefix}" if prefix else "")
        self.scheme = scheme
        self.storage_options: dict[str, Any] = dict(storage_options or {})
        self._store = self._open_store()

    def __repr__(self) -> str:
        return f"ObstoreClient({self.url!r})"

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url, "storage_options": self.storage_options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["url"], state["storage_options"])  # type: ignore[misc]

    def _open_store(self) -> Any:
        try:
            import obstore.store
            from obstore.exceptions import BaseError as ObstoreBaseError
        except ImportError as error:
            raise ShardstoreError(f"{self.url} needs the optional remote dependencies: {_REMOTE_EXTRA}") from error
        config = dict(self.storage_options)
        client_options = dict(config.pop("client_options", None) or {})
        kwargs: dict[str, Any] = {}
        if self.scheme == "s3":
            endpoint = config.get("endpoint") or config.get("aws_endpoint") or next(
                (os.environ[name] for name in _ENDPOINT_ENV if os.environ.get(name)), None)
            if endpoint:
                if str(endpoint).startswith("http://"):
                    client_options.setdefault("allow_http", True)
                if not any(k in config for k in ("region", "aws_region", "default_region")) \
                        and not (os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")):
                    config["region"] = "us-east-1"
            profile = config.pop("profile", None)
            if profile is not None:
                kwargs["credential_provider"] = self._profile_credentials(profile)
        try:
            return obstore.store.from_url(self.url, config=config or None, client_options=client_options or None,
                                          retry_config={"max_retries": 0}, **kwargs)
        except ObstoreBaseError as error:
            raise ConfigError(f"{self.url}: the storage options are not valid: {_summary(error)}; see obstore's "
                              f"store configuration for {self.scheme}://") from error

    def _profile_credentials(self, profile: str) -> Any:
        try:
            import boto3
            from obstore.auth.boto3 import Boto3CredentialProvider
        except ImportError as error:
            raise ShardstoreError(f"{self.url}: the 'profile' storage option needs boto3: "
                                  f"{_REMOTE_EXTRA}") from error
        try:
            return Boto3CredentialProvider(boto3.Session(profile_name=profile))
        except Exception as error:  # botocore's ProfileNotFound, missing credentials (ValueError)
            raise ConfigError(f"{self.url}: cannot read credentials of AWS profile {profile!r}: {error}; check "
                              f"~/.aws/config") from error

    def _object_url(self, key: str) -> str:
        return f"{self.url}/{key}"

    def _ready(self, key: str) -> str:
        """``key`` checked, and this process checked to be one where obstore requests can work."""
        global _requests_sent
        check_key(key, self.url)
        if _forked_after_requests:
            raise ShardstoreError(f"{self.url}: object-store requests cannot run in a process fork()-ed after its "
                                  f"parent sent some (obstore's runtime does not survive a fork); start workers "
                                  f"with multiprocessing_context='spawn' or 'forkserver', or read in the parent")
        _requests_sent = True
        return key

    def _fail(self, error: BaseException, key: str, doing: str) -> RemoteError:
        return classify_error(error, self._object_url(key), doing)

    def head(self, key: str) -> ObjectInfo:
        """Size, ETag, version and mtime of ``key``; ``ObjectNotFound`` if it does not exist."""
        import obstore

        self._ready(key)
        try:
            meta = obstore.head(self._store, key)
        except Exception as error:
            raise self._fail(error, key, "HEAD") from error
        return _info(key, meta)

    def get_range(self, key: str, start: int, end: int, *, if_match: str | None = None) -> bytes:
        """Bytes ``[start, end)`` of ``key`` in one ranged GET (HTTP 206); ``if_match`` is sent as If-Match.

        An empty range returns ``b""`` without a request. A body shorter than asked is a
        ``TransientRemoteError``; a range past the end of the object, a ``RemoteError``.
        """
        return self.get_range_view(key, start, end, if_match=if_match).tobytes()

    def get_range_view(self, key: str, start: int, end: int, *, if_match: str | None = None) -> memoryview:
        """``get_range`` without the copy into ``bytes``: a read-only view of the buffer obstore received.

        The copy is most of what a ranged GET costs the client: 8 MiB parts on 4 threads read 1.3-2.0x faster
        as views than as ``bytes``, for 0.57-0.82x the CPU per GB (three runs of bench/remote_clients.py with its
        sendfile server on a 2-core VM; the copy's time goes mostly to page faults of fresh 8 MiB
        allocations). Give the view to ``os.write`` or ``numpy.frombuffer`` directly.
        """
        import obstore

        self._ready(key)
        _check_range(start, end)
        if start == end:
            return memoryview(b"")
        options: dict[str, Any] = {"range": (start, end)}
        if if_match is not None:
            options["if_match"] = if_match
        doing = f"GET [{start:,}, {end:,})"
        try:
            result = obstore.get(self._store, key, options=options)
            data = memoryview(result.bytes())
            size = int(result.meta["size"])
        except Exception as error:
            raise self._fail(error, key, doing) from error
        if data.nbytes != end - start:
            if size < end:
                raise RemoteError(f"{doing} {self._object_url(key)}: the object has only {size:,} bytes; it is "
                                  f"shorter than its listing said (list the objects again)")
            raise TransientRemoteError(f"{doing} {self._object_url(key)}: the body has {data.nbytes:,} bytes, "
                                       f"{end - start:,} were asked (truncated)")
        return data

    def get(self, key: str) -> bytes:
        """The whole object; a body shorter than its size is a ``TransientRemoteError``."""
        import obstore

        self._ready(key)
        try:
            result = obstore.get(self._store, key)
            data = bytes(result.bytes())
            size = int(result.meta["size"])
        except Exception as error:
            raise self._fail(error, key, "GET") from error
        if len(data) != size:
            raise TransientRemoteError(f"GET {self._object_url(key)}: the body has {len(data):,} bytes of "
                                       f"{size:,} (truncated)")
        return data

    def put(self, key: str, data: bytes) -> None:
        """One PUT of the whole object (never multipart: readers see the old object or the new one)."""
        import obstore

        self._ready(key)
        try:
            obstore.put(self._store, key, data, use_multipart=False)
        except Exception as error:
            raise self._fail(error, key, "PUT") from error

    def delete(self, key: str) -> None:
        """Remove ``key``; no error if it is already gone."""
        import obstore

        self._ready(key)
        try:
            obstore.delete(self._store, key)
        except Exception as error:
            failure = self._fail(error, key, "DELETE")
            if not isinstance(failure, ObjectNotFound):
                raise failure from error

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix``, in key order (the order the stores list in)."""
        import obstore

        # obstore's prefix is a whole path (``a/b`` lists ``a/b/...``, not ``a/bc``): list the directory part
        # of ``prefix`` and keep the keys that start with all of it.
        top = prefix.rpartition("/")[0]
        self._ready(top or "list")
        try:
            for chunk in obstore.list(self._store, prefix=top or None, chunk_size=1000):
                for meta in chunk:
                    key = meta["path"]
                    if key.startswith(prefix):
                        yield _info(key, meta)
        except Exception as error:
            raise classify_error(error, f"{self.url}/{prefix}", "LIST") from error
