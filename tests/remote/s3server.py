"""A real S3-compatible server on 127.0.0.1 (moto), with client helpers and the test credentials.

Used by the remote tests and by the bench scripts, so nothing here imports pytest; moto and boto3 are
imported when a server or a client is made. The fault-injecting proxy that goes in front of the server
lives in ``faultproxy``; ``FaultProxy`` and ``KeyStats`` are re-exported here, so imports from this module
keep working. Both objects are context managers and shut down cleanly.

    with S3Server() as s3, FaultProxy(s3.endpoint) as proxy:
        s3.create_bucket("cache")
        s3.upload_tree("cache_dir", "cache", "v1")
        proxy.slowdown_share = 0.1            # a tenth of the requests answered 503 SlowDown
        client = s3.boto3_client(endpoint=proxy.endpoint)

Every ThreadedMotoServer in one process shares moto's in-memory backends: use a fresh bucket per test.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from tests.remote.faultproxy import FaultProxy, KeyStats

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["CREDENTIALS", "REGION", "FaultProxy", "KeyStats", "S3Server", "boto3_client", "obstore_store"]

REGION = "us-east-1"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": REGION}


def boto3_client(endpoint: str, *, max_attempts: int | None = None):
    """A boto3 S3 client for ``endpoint`` with the test credentials and path-style addressing.

    ``max_attempts=1`` turns botocore's retries off, so a test sees each injected fault.
    """
    import boto3
    from botocore.config import Config

    retries = {"mode": "standard"} if max_attempts is None else {"mode": "standard", "total_max_attempts": max_attempts}
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        config=Config(s3={"addressing_style": "path"}, retries=retries, max_pool_connections=64),
    )


def obstore_store(endpoint: str, bucket: str, *, prefix: str | None = None, max_retries: int | None = None):
    """An obstore ``S3Store`` for ``bucket`` at ``endpoint`` with the test credentials, plain HTTP allowed.

    ``max_retries=0`` turns obstore's retries off (by default it retries 5xx and resumes a cut body).
    """
    from obstore.store import S3Store

    return S3Store(bucket, prefix=prefix, endpoint=endpoint, region=REGION,
                   access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                   secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                   client_options={"allow_http": True},
                   retry_config=None if max_retries is None else {"max_retries": max_retries})


class S3Server:
    """moto's S3 server in a thread on 127.0.0.1 at a port the OS picks; ``endpoint`` is its URL."""

    def __init__(self) -> None:
        self._server = None
        self._client = None  # for the server itself; boto3 clients are thread-safe
        self.endpoint = ""

    def start(self) -> S3Server:
        from moto.server import ThreadedMotoServer

        # werkzeug logs a line per request at INFO; the tests and benches make thousands
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        return self

    def close(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = self._client = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def boto3_client(self, endpoint: str | None = None, *, max_attempts: int | None = None):
        """A boto3 client for this server, or for ``endpoint`` (a proxy in front of it)."""
        if endpoint is None and max_attempts is None:
            if self._client is None:
                self._client = boto3_client(self.endpoint)
            return self._client
        return boto3_client(endpoint or self.endpoint, max_attempts=max_attempts)

    def create_bucket(self, name: str) -> str:
        self.boto3_client().create_bucket(Bucket=name)
        return name

    def upload_tree(self, local_dir: str | Path, bucket: str, prefix: str = "") -> list[str]:
        """Upload every file under ``local_dir`` to ``bucket`` under ``prefix`` (like ``aws s3 sync``).

        Each file goes in one PUT, so its ETag is its MD5. Returns the keys, sorted.
        """
        root = Path(local_dir)
        client = self.boto3_client()
        keys = []
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            rel = path.relative_to(root).as_posix()
            key = f"{prefix.strip('/')}/{rel}" if prefix.strip("/") else rel
            with open(path, "rb") as f:
                client.put_object(Bucket=bucket, Key=key, Body=f)
            keys.append(key)
        return sorted(keys)
