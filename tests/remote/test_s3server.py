"""The S3 test server and the fault proxy do what the remote tests rely on, seen from boto3 and obstore."""

from __future__ import annotations

import http.client
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pytest

from tests.remote.s3server import FaultProxy, S3Server, obstore_store

KEY = "cache/images_000000.npy"


def put(s3_server: S3Server, bucket: str, key: str, size: int, seed: int = 0) -> bytes:
    """Write ``size`` seeded random bytes to ``key`` straight on the server (not through the proxy)."""
    data = random.Random(seed).randbytes(size)
    s3_server.boto3_client().put_object(Bucket=bucket, Key=key, Body=data)
    return data


def test_upload_tree_uploads_every_file_under_the_prefix(s3_server, bucket, tmp_path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    files = {"a.npy": b"aaa", "sub/b.npy": b"bb", "sub/deeper/c.json": b"{}"}
    for rel, data in files.items():
        (tmp_path / rel).write_bytes(data)
    keys = s3_server.upload_tree(tmp_path, bucket, "v1/")
    assert keys == sorted(f"v1/{rel}" for rel in files)
    client = s3_server.boto3_client()
    for rel, data in files.items():
        assert client.get_object(Bucket=bucket, Key=f"v1/{rel}")["Body"].read() == data


def test_ranged_get_is_206_with_the_exact_bytes_boto3(s3_server, s3_proxy, bucket):
    data = put(s3_server, bucket, KEY, 100_000)
    resp = s3_server.boto3_client(s3_proxy.endpoint).get_object(Bucket=bucket, Key=KEY, Range="bytes=1000-1999")
    assert resp["ResponseMetadata"]["HTTPStatusCode"] == 206
    assert resp["ContentRange"] == "bytes 1000-1999/100000"
    assert resp["Body"].read() == data[1000:2000]


def test_ranged_get_is_206_with_the_exact_bytes_obstore(s3_server, s3_proxy, bucket):
    import obstore

    data = put(s3_server, bucket, KEY, 100_000)
    store = obstore_store(s3_proxy.endpoint, bucket)
    assert bytes(obstore.get_range(store, KEY, start=1000, end=2000)) == data[1000:2000]
    assert s3_proxy.stats()[f"{bucket}/{KEY}"].requests == {("GET", 206): 1}


@pytest.mark.slow
def test_slowdown_share_is_the_seeded_share_of_requests(s3_server, s3_proxy, bucket):
    from botocore.exceptions import ClientError

    put(s3_server, bucket, KEY, 100)
    s3_proxy.slowdown_share = 0.25
    client = s3_server.boto3_client(s3_proxy.endpoint, max_attempts=1)
    codes = []
    for _ in range(200):
        try:
            client.get_object(Bucket=bucket, Key=KEY)["Body"].read()
            codes.append("ok")
        except ClientError as e:
            codes.append(e.response["Error"]["Code"])
    draws = random.Random(0)  # the proxy's seed: one draw per request, in order
    expected = [draws.random() < 0.25 for _ in range(200)]
    assert codes == ["SlowDown" if slow else "ok" for slow in expected]
    assert 30 <= codes.count("SlowDown") <= 70  # Binomial(200, 0.25): mean 50, sd 6.1
    assert s3_proxy.stats()[f"{bucket}/{KEY}"].count("GET", 503) == codes.count("SlowDown")


def test_fail_next_answers_the_next_requests_with_the_status(s3_server, s3_proxy, bucket):
    from botocore.exceptions import ClientError

    put(s3_server, bucket, KEY, 100)
    client = s3_server.boto3_client(s3_proxy.endpoint, max_attempts=1)
    s3_proxy.fail_next(500, 2)
    for _ in range(2):
        with pytest.raises(ClientError, match="InternalError"):
            client.get_object(Bucket=bucket, Key=KEY)
    assert len(client.get_object(Bucket=bucket, Key=KEY)["Body"].read()) == 100
    assert s3_proxy.stats()[f"{bucket}/{KEY}"].requests == {("GET", 500): 2, ("GET", 200): 1}


def test_truncated_body_is_an_error_for_boto3(s3_server, s3_proxy, bucket):
    from botocore.exceptions import IncompleteReadError, ResponseStreamingError

    data = put(s3_server, bucket, KEY, 1 << 20)
    client = s3_server.boto3_client(s3_proxy.endpoint)
    s3_proxy.truncate_next()
    with pytest.raises((ResponseStreamingError, IncompleteReadError)):
        client.get_object(Bucket=bucket, Key=KEY)["Body"].read()
    assert s3_proxy.stats()[f"{bucket}/{KEY}"].body_bytes == (1 << 20) // 2
    assert client.get_object(Bucket=bucket, Key=KEY)["Body"].read() == data  # only the next one was cut


def test_truncated_body_is_an_error_for_obstore_without_retries(s3_server, s3_proxy, bucket):
    import obstore

    put(s3_server, bucket, KEY, 1 << 20)
    s3_proxy.truncate_next(predicate=lambda method, key, headers: key.endswith(KEY))
    with pytest.raises(Exception, match="body error"):
        obstore.get_range(obstore_store(s3_proxy.endpoint, bucket, max_retries=0), KEY, start=0, end=1 << 20)


def test_obstore_resumes_a_truncated_body_with_a_ranged_get(s3_server, s3_proxy, bucket):
    """obstore's default retries hide a cut body: the proxy sees the cut GET and a GET for the rest."""
    import obstore

    data = put(s3_server, bucket, KEY, 1 << 20)
    s3_proxy.truncate_next()
    assert bytes(obstore.get(obstore_store(s3_proxy.endpoint, bucket), KEY).bytes()) == data
    stats = s3_proxy.stats()[f"{bucket}/{KEY}"]
    assert stats.requests == {("GET", 200): 1, ("GET", 206): 1}
    assert stats.body_bytes == 1 << 20


def test_body_bytes_and_requests_are_counted_per_key(s3_server, s3_proxy, bucket):
    import obstore

    put(s3_server, bucket, "a.npy", 10_000, seed=1)
    put(s3_server, bucket, "b.npy", 20_000, seed=2)
    client = s3_server.boto3_client(s3_proxy.endpoint)
    client.get_object(Bucket=bucket, Key="a.npy", Range="bytes=0-999")["Body"].read()
    client.get_object(Bucket=bucket, Key="a.npy")["Body"].read()
    client.head_object(Bucket=bucket, Key="b.npy")
    obstore.get_range(obstore_store(s3_proxy.endpoint, bucket), "b.npy", start=500, end=3500)
    stats = s3_proxy.stats()
    assert stats[f"{bucket}/a.npy"].requests == {("GET", 206): 1, ("GET", 200): 1}
    assert stats[f"{bucket}/a.npy"].body_bytes == 1000 + 10_000
    assert stats[f"{bucket}/b.npy"].requests == {("HEAD", 200): 1, ("GET", 206): 1}
    assert stats[f"{bucket}/b.npy"].body_bytes == 3000
    assert s3_proxy.total_bytes == 14_000 and s3_proxy.total_requests == 4
    s3_proxy.reset()
    assert s3_proxy.stats() == {} and s3_proxy.total_bytes == 0 and s3_proxy.total_requests == 0


@pytest.mark.slow
def test_bandwidth_cap_slows_a_download_to_the_rate(s3_server, s3_proxy, bucket):
    """4 MiB at 8 MiB/s cannot arrive in under 0.5 s; 0.4 s leaves room for clock granularity (a lower bound)."""
    data = put(s3_server, bucket, KEY, 4 << 20)
    client = s3_server.boto3_client(s3_proxy.endpoint)
    s3_proxy.bandwidth = 8 << 20
    start = time.monotonic()
    body = client.get_object(Bucket=bucket, Key=KEY)["Body"].read()
    assert time.monotonic() - start >= 0.4
    assert body == data


def test_if_match_mismatch_is_412(s3_server, s3_proxy, bucket):
    import obstore
    from botocore.exceptions import ClientError

    data = put(s3_server, bucket, KEY, 1000)
    client = s3_server.boto3_client(s3_proxy.endpoint, max_attempts=1)
    etag = client.head_object(Bucket=bucket, Key=KEY)["ETag"]
    with pytest.raises(ClientError, match="PreconditionFailed"):
        client.get_object(Bucket=bucket, Key=KEY, Range="bytes=0-9", IfMatch='"0123456789abcdef"')
    assert client.get_object(Bucket=bucket, Key=KEY, Range="bytes=0-9", IfMatch=etag)["Body"].read() == data[:10]
    with pytest.raises(obstore.exceptions.PreconditionError):
        obstore.get(obstore_store(s3_proxy.endpoint, bucket), KEY, options={"if_match": '"0123"', "range": (0, 10)})
    assert s3_proxy.stats()[f"{bucket}/{KEY}"].count("GET", 412) == 2


def test_on_request_can_replace_the_object_between_two_ranged_gets(s3_server, s3_proxy, bucket):
    from botocore.exceptions import ClientError

    put(s3_server, bucket, KEY, 1000, seed=1)
    client = s3_server.boto3_client(s3_proxy.endpoint, max_attempts=1)
    first = client.get_object(Bucket=bucket, Key=KEY, Range="bytes=0-499")
    calls = []

    def replace_once(method, key, headers):
        calls.append((method, key, headers.get("Range")))
        if len(calls) == 1:
            put(s3_server, bucket, KEY, 1000, seed=2)

    s3_proxy.on_request = replace_once
    with pytest.raises(ClientError, match="PreconditionFailed"):
        client.get_object(Bucket=bucket, Key=KEY, Range="bytes=500-999", IfMatch=first["ETag"])
    assert calls == [("GET", f"{bucket}/{KEY}", "bytes=500-999")]


def test_32_ranged_gets_are_in_flight_at_once(s3_server, s3_proxy, bucket):
    """Every request waits in the hook until all 32 have arrived, so all 32 connections are open together."""
    import obstore

    data = put(s3_server, bucket, KEY, 32 * 4096)
    arrived = threading.Barrier(32, timeout=20)
    s3_proxy.on_request = lambda method, key, headers: arrived.wait()
    # no retries: a request that finds the barrier broken fails the test at once
    boto = s3_server.boto3_client(s3_proxy.endpoint, max_attempts=1)
    store = obstore_store(s3_proxy.endpoint, bucket, max_retries=0)

    def fetch(i: int) -> bytes:
        lo = i * 4096
        if i % 2:
            return bytes(obstore.get_range(store, KEY, start=lo, end=lo + 4096))
        return boto.get_object(Bucket=bucket, Key=KEY, Range=f"bytes={lo}-{lo + 4095}")["Body"].read()

    with ThreadPoolExecutor(32) as pool:
        chunks = list(pool.map(fetch, range(32)))
    assert b"".join(chunks) == data
    assert s3_proxy.stats()[f"{bucket}/{KEY}"].requests == {("GET", 206): 32}


def test_puts_go_through_the_proxy(s3_server, s3_proxy, bucket):
    import obstore

    data = os.urandom(3 << 20)
    s3_server.boto3_client(s3_proxy.endpoint).put_object(Bucket=bucket, Key="boto.bin", Body=data)
    obstore.put(obstore_store(s3_proxy.endpoint, bucket), "obstore.bin", data)
    direct = s3_server.boto3_client()
    for key in ("boto.bin", "obstore.bin"):
        assert direct.get_object(Bucket=bucket, Key=key)["Body"].read() == data
        assert s3_proxy.stats()[f"{bucket}/{key}"].requests == {("PUT", 200): 1}


def test_aws_env_points_default_clients_at_the_proxy(s3_server, s3_proxy, bucket, aws_env):
    import boto3
    import obstore
    from obstore.store import S3Store

    data = put(s3_server, bucket, KEY, 1000)
    assert boto3.client("s3").get_object(Bucket=bucket, Key=KEY)["Body"].read() == data
    assert bytes(obstore.get(S3Store(bucket), KEY).bytes()) == data
    assert s3_proxy.stats()[f"{bucket}/{KEY}"].count("GET") == 2


def test_close_ends_idle_keep_alive_connections(s3_server, bucket):
    proxy = FaultProxy(s3_server.endpoint)
    parts = urlsplit(proxy.endpoint)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    conn.request("GET", f"/{bucket}")  # unsigned, so moto may refuse it; either way the connection stays open
    resp = conn.getresponse()
    resp.read()
    assert resp.status in (200, 403) and not resp.will_close
    proxy.close()
    assert not proxy._thread.is_alive()
    conn.request("GET", f"/{bucket}")
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        conn.getresponse()


@pytest.mark.slow
def test_latency_is_added_before_each_response(s3_server, s3_proxy, bucket):
    """A lower bound only: two requests at 0.2 s each cannot finish in under 0.4 s."""
    put(s3_server, bucket, KEY, 100)
    client = s3_server.boto3_client(s3_proxy.endpoint)
    client.head_object(Bucket=bucket, Key=KEY)  # the connection is open before the clock starts
    s3_proxy.latency_s = 0.2
    start = time.monotonic()
    client.head_object(Bucket=bucket, Key=KEY)
    client.get_object(Bucket=bucket, Key=KEY)["Body"].read()
    assert time.monotonic() - start >= 0.4


def test_a_failing_hook_is_answered_500(s3_server, s3_proxy, bucket, capsys):
    from botocore.exceptions import ClientError

    put(s3_server, bucket, KEY, 100)

    def broken(method, key, headers):
        raise RuntimeError("hook broke")

    s3_proxy.on_request = broken
    with pytest.raises(ClientError, match="ProxyHookFailed"):
        s3_server.boto3_client(s3_proxy.endpoint, max_attempts=1).get_object(Bucket=bucket, Key=KEY)
    assert "hook broke" in capsys.readouterr().err
