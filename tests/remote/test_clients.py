"""URLs and sizes; the file:// client; the obstore client against a real local S3 server (moto) and a faulty one."""

from __future__ import annotations

import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from shardstore.errors import ConfigError, ShardstoreError
from shardstore.remote import file_client as clients
from shardstore.remote.clients import open_client
from shardstore.remote.file_client import FileClient
from shardstore.remote.objects import (
    ObjectChanged,
    ObjectNotFound,
    RemoteError,
    TransientRemoteError,
)
from shardstore.remote.obstore_client import ObstoreClient
from shardstore.remote.retry import RetryPolicy, call_with_retries
from shardstore.remote.url import is_remote, join_key, parse_size, split_url

# ---- URLs ----


@pytest.mark.parametrize("root, remote", [
    ("s3://bucket/prefix", True), ("gs://b", True), ("az://container/p", True), ("file:///data", True),
    ("S3://bucket", True), ("/data/cache", False), ("data/cache", False), (Path("/data"), False),
    (Path("s3://bucket/x"), False), ("http://host/x", False), ("s3:/bucket", False), ("", False), (None, False),
])
def test_is_remote(root, remote):
    assert is_remote(root) is remote


@pytest.mark.parametrize("url, parts", [
    ("s3://bucket/a/b", ("s3", "bucket", "a/b")),
    ("s3://bucket/a/b/", ("s3", "bucket", "a/b")),
    ("s3://bucket", ("s3", "bucket", "")),
    ("s3://bucket/", ("s3", "bucket", "")),
    ("GS://my_bucket.x/p", ("gs", "my_bucket.x", "p")),
    ("az://container/deep/er", ("az", "container", "deep/er")),
    ("file:///data/cache/", ("file", "", "/data/cache")),
    ("file://localhost/data", ("file", "", "/data")),
    ("file:///", ("file", "", "/")),
])
def test_split_url(url, parts):
    assert split_url(url) == parts


@pytest.mark.parametrize("url, match", [
    ("s3://", r"names no bucket; write s3://<bucket>/<prefix>"),
    ("s3:///prefix", "names no bucket"),
    ("http://host/x", r"unsupported URL scheme 'http://'.*supported schemes are s3://, gs://, az://, file://"),
    ("hdfs://nn/x", "unsupported URL scheme 'hdfs://'"),
    ("/data/cache", "is not an object-store URL"),
    ("file://data/cache", "a file:// URL takes an absolute path, three slashes"),
    ("s3://bu ket/x", "is not a valid bucket name"),
    ("s3://bucket/a/../b", r"contains a '\.' or '\.\.' segment"),
    ("s3://bucket/a//b", "contains an empty segment"),
    ("s3://bucket/a\nb", "contains a control character"),
])
def test_split_url_refuses_with_one_line_naming_the_fix(url, match):
    with pytest.raises(ShardstoreError, match=match) as info:
        split_url(url)
    assert "\n" not in str(info.value)


def test_split_url_refuses_a_path_object():
    with pytest.raises(ShardstoreError, match="write it as a string"):
        split_url(Path("/data"))  # type: ignore[arg-type]


@pytest.mark.parametrize("prefix, key, joined", [
    ("", "a/b", "a/b"), ("p", "a", "p/a"), ("p/", "/a", "p/a"), ("p/q", "", "p/q"), ("", "", ""),
])
def test_join_key(prefix, key, joined):
    assert join_key(prefix, key) == joined


# ---- sizes ----


@pytest.mark.parametrize("value, size", [
    (1, 1), (4096, 4096), ("4096", 4096), ("1B", 1), ("12 b", 12),
    ("50GB", 50 * 10**9), ("50gb", 50 * 10**9), ("2 KB", 2000), ("3MB", 3 * 10**6), ("1TB", 10**12),
    ("512MiB", 512 * 2**20), ("1KiB", 1024), ("2gib", 2 * 2**30), ("1 TiB", 2**40),
    ("1.5 GB", 1_500_000_000), ("1.1TB", 1_100_000_000_000), ("0.5KiB", 512), (".5 KB", 500), ("  7  ", 7),
    ("2.000B", 2),
])
def test_parse_size_accepts(value, size):
    assert parse_size(value) == size


@pytest.mark.parametrize("value, match", [
    (0, "at least 1 byte"), (-5, "at least 1 byte"), ("0", "at least 1 byte"), ("0 GB", "at least 1 byte"),
    ("50G", "is not a size; use a whole number of bytes"), ("10 MBs", "is not a size"), ("-1GB", "is not a size"),
    ("1e9", "is not a size"), ("", "is not a size"), ("GB", "is not a size"), ("1,000", "is not a size"),
    ("1.5B", "not a whole number of bytes"), ("0.0001KB", "not a whole number of bytes"),
    (True, "must be a whole number of bytes"), (1.5, "must be a whole number of bytes"),
    (None, "must be a whole number of bytes"),
])
def test_parse_size_refuses_with_the_accepted_forms(value, match):
    with pytest.raises(ConfigError, match=match) as info:
        parse_size(value)
    assert "\n" not in str(info.value)


def test_parse_size_names_the_setting():
    with pytest.raises(ConfigError, match="^cache_size '50G' is not a size.*KiB, MiB, GiB, TiB"):
        parse_size("50G", name="cache_size")


def test_remote_modules_import_without_the_optional_dependencies():
    code = ("import sys; import shardstore.remote.clients, shardstore.remote.retry, shardstore.remote.gate, "
            "shardstore.remote.url; bad = [m for m in ('obstore', 'boto3', 'moto') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_obstore_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "obstore", None)
    monkeypatch.setitem(sys.modules, "obstore.store", None)
    with pytest.raises(ShardstoreError, match=r"^s3://bucket/p needs the optional remote dependencies: "
                                              r"pip install 'shardstore\[remote\]'$"):
        open_client("s3://bucket/p")


# ---- file:// ----


@pytest.fixture
def fc(tmp_path) -> FileClient:
    client = open_client(f"file://{tmp_path}/root")
    assert isinstance(client, FileClient)
    return client


def test_file_round_trip(fc):
    fc.put("shard_000001/images.npy", b"0123456789")
    info = fc.head("shard_000001/images.npy")
    assert (info.key, info.size) == ("shard_000001/images.npy", 10) and info.etag and info.mtime_ns
    assert fc.get("shard_000001/images.npy") == b"0123456789"
    assert fc.get_range("shard_000001/images.npy", 2, 5) == b"234"
    assert fc.get_range("shard_000001/images.npy", 0, 10) == b"0123456789"
    assert fc.get_range("shard_000001/images.npy", 4, 4) == b""
    assert fc.get_range_view("shard_000001/images.npy", 1, 3) == memoryview(b"12")
    assert [i.key for i in fc.list()] == ["shard_000001/images.npy"]
    fc.delete("shard_000001/images.npy")
    fc.delete("shard_000001/images.npy")   # already gone: no error
    with pytest.raises(ObjectNotFound, match=r"^file://.*/root/shard_000001/images.npy: no such object"):
        fc.head("shard_000001/images.npy")
    assert list(fc.list()) == []


def test_file_missing_objects(fc):
    for call in (lambda: fc.head("nope"), lambda: fc.get("nope"), lambda: fc.get_range("nope", 0, 1)):
        with pytest.raises(ObjectNotFound, match="nope: no such object"):
            call()
    fc.put("dir/x", b"x")
    with pytest.raises(ObjectNotFound, match="not a file"):
        fc.head("dir")


def test_file_range_past_the_end_is_not_transient(fc):
    fc.put("k", b"abc")
    with pytest.raises(RemoteError, match=r"bytes \[1, 9\) asked of an object of 3 bytes") as info:
        fc.get_range("k", 1, 9)
    assert not isinstance(info.value, TransientRemoteError)
    with pytest.raises(ValueError):
        fc.get_range("k", 2, 1)


def test_file_if_match(fc):
    fc.put("k", b"old!")
    etag = fc.head("k").etag
    assert fc.get_range("k", 0, 4, if_match=etag) == b"old!"
    fc.put("k", b"new!")                       # replaced by a rename: another inode, another ETag
    assert fc.head("k").etag != etag
    with pytest.raises(ObjectChanged, match=r"k: the object changed \(ETag .*, expected .*\); list the objects"):
        fc.get_range("k", 0, 4, if_match=etag)


def test_file_in_place_write_during_a_read_is_object_changed(fc, monkeypatch):
    fc.put("k", b"a" * 100)
    etag = fc.head("k").etag
    path = Path(fc.root) / "k"
    real = FileClient._read

    def read_while_written(self, key, fd, start, end):
        data = real(self, key, fd, start, end)
        with open(path, "r+b") as f:         # same inode and size, new content and mtime
            f.write(b"b" * 100)
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
        return data

    monkeypatch.setattr(FileClient, "_read", read_while_written)
    with pytest.raises(ObjectChanged, match="changed while it was read"):
        fc.get_range("k", 0, 10, if_match=etag)


def test_file_truncated_during_a_read_is_transient(fc, monkeypatch):
    fc.put("k", b"a" * 100)
    path = Path(fc.root) / "k"
    real = FileClient._read

    def read_after_truncation(self, key, fd, start, end):
        os.truncate(path, 30)
        return real(self, key, fd, start, end)

    monkeypatch.setattr(FileClient, "_read", read_after_truncation)
    with pytest.raises(TransientRemoteError, match=r"read 20 of 40 bytes from offset 10 \(the file was truncated"):
        fc.get_range("k", 10, 50)


@pytest.mark.parametrize("key", ["../x", "../../etc/passwd", "/etc/passwd", "a/../../x", "a//b", "", "a/./b",
                                 "a/", "a\\b", "a\x00b", ".."])
def test_file_refuses_hostile_keys(fc, tmp_path, key):
    for call in (lambda: fc.put(key, b"evil"), lambda: fc.get(key), lambda: fc.head(key),
                 lambda: fc.get_range(key, 0, 1), lambda: fc.delete(key)):
        with pytest.raises(ShardstoreError, match="not a plain relative key|empty or non-string object key") as info:
            call()
        assert "\n" not in str(info.value) and not isinstance(info.value, RemoteError)
    assert sorted(p.name for p in tmp_path.iterdir()) == []   # nothing written anywhere, not even the root


def test_file_put_is_atomic_for_concurrent_readers(fc):
    old, new = b"o" * 300_000, b"n" * 700_000
    fc.put("k", old)
    stop = threading.Event()
    seen: set[bytes] = set()

    def writer() -> None:
        for i in range(40):
            fc.put("k", new if i % 2 == 0 else old)
        stop.set()

    thread = threading.Thread(target=writer)
    thread.start()
    while not stop.is_set():
        data = fc.get("k")
        assert data in (old, new)
        seen.add(data[:1])
    thread.join()
    assert [p.name for p in Path(fc.root).iterdir()] == ["k"]    # no temporaries left


def test_file_put_that_fails_keeps_the_old_object(fc, monkeypatch):
    import errno
    fc.put("k", b"old")

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(clients.os, "fsync", no_space)
    with pytest.raises(RemoteError, match=r"k: no space left writing 3 bytes; free space .* the old object"):
        fc.put("k", b"new")
    monkeypatch.undo()
    assert fc.get("k") == b"old"
    assert [p.name for p in Path(fc.root).iterdir()] == ["k"]


def test_file_list_is_recursive_sorted_by_key_and_filters_by_string_prefix(fc):
    keys = ["a/b", "a-b", "a.txt", "a0", "a/c/d", "b", "ab/x", ".hidden", "a/.k.tmp-1-ff"]
    for key in keys:
        fc.put(key, key.encode())
    assert [i.key for i in fc.list()] == sorted(keys)
    assert [i.key for i in fc.list("a")] == sorted(k for k in keys if k.startswith("a"))
    assert [i.key for i in fc.list("a/")] == ["a/.k.tmp-1-ff", "a/b", "a/c/d"]
    assert [i.key for i in fc.list("a/c")] == ["a/c/d"]
    assert [i.key for i in fc.list("zz/")] == []
    assert [i.size for i in fc.list("a/c/")] == [5]


def test_file_list_follows_a_directory_link_loop_once(fc):
    fc.put("d/x", b"x")
    os.symlink(Path(fc.root) / "d", Path(fc.root) / "d" / "loop")
    assert [i.key for i in fc.list()] == ["d/x"]


@pytest.mark.parametrize("prefix", ["../", "../x", "a/../../", "/..//", "a//b"])
def test_file_list_refuses_a_prefix_that_leaves_the_root(fc, prefix):
    (Path(fc.root).parent / "outside").write_bytes(b"secret")
    fc.put("a/b", b"x")
    with pytest.raises(ShardstoreError, match="not a plain relative key"):
        list(fc.list(prefix))


def test_file_client_pickles_and_takes_no_options(fc, tmp_path):
    fc.put("k", b"v")
    again = pickle.loads(pickle.dumps(fc))
    assert again == fc and again.get("k") == b"v" and again.url == fc.url
    with pytest.raises(ConfigError, match="a file:// root takes no storage options"):
        open_client(f"file://{tmp_path}", {"region": "x"})


# ---- s3:// against moto's server ----

BUCKET = "shardstore-test"


@pytest.fixture(scope="module")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1 with one bucket; the AWS_* variables point at it for the module."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT", "AWS_ENDPOINT_URL_S3",
                     "AWS_SESSION_TOKEN"):
            mp.delenv(name, raising=False)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_ENDPOINT_URL", endpoint)
        boto3.client("s3", region_name="us-east-1").create_bucket(Bucket=BUCKET)
        yield endpoint
    server.stop()


@pytest.fixture
def s3(s3_endpoint, request) -> ObstoreClient:
    client = open_client(f"s3://{BUCKET}/{request.node.name[:40]}")
    assert isinstance(client, ObstoreClient)
    return client


def test_s3_head_get_range_and_if_match(s3):
    data = os.urandom(3 * 2**20 + 17)
    s3.put("shard_000001/images.npy", data)
    info = s3.head("shard_000001/images.npy")
    assert info.size == len(data) and info.etag and info.mtime_ns
    assert s3.get_range("shard_000001/images.npy", 1, 2**20 + 1) == data[1:2**20 + 1]
    assert s3.get_range("shard_000001/images.npy", len(data) - 5, len(data), if_match=info.etag) == data[-5:]
    assert s3.get_range("shard_000001/images.npy", 7, 7) == b""
    view = s3.get_range_view("shard_000001/images.npy", 5, 2**20, if_match=info.etag)
    assert isinstance(view, memoryview) and view.readonly and view == data[5:2**20]
    assert s3.get("shard_000001/images.npy") == data
    with pytest.raises(ObjectChanged, match=r"^GET \[0, 10\) s3://shardstore-test/.*/shard_000001/images.npy: "
                                            r"the object was replaced .*HTTP 412"):
        s3.get_range("shard_000001/images.npy", 0, 10, if_match='"0123456789abcdef0123456789abcdef"')
    s3.put("shard_000001/images.npy", b"replaced")
    with pytest.raises(ObjectChanged):
        s3.get_range("shard_000001/images.npy", 0, 4, if_match=info.etag)


def test_s3_not_found(s3, s3_endpoint):
    for call in (lambda: s3.head("nope"), lambda: s3.get("nope"), lambda: s3.get_range("nope", 0, 4)):
        with pytest.raises(ObjectNotFound, match=r"s3://shardstore-test/.*/nope: not found .*check the URL"):
            call()
    with pytest.raises(ObjectNotFound, match=r"s3://no-such-bucket-x/p/k: not found"):
        open_client("s3://no-such-bucket-x/p").get("k")


def test_s3_range_past_the_end_is_not_transient(s3):
    s3.put("k", b"0123456789")
    with pytest.raises(RemoteError, match=r"s3://.*/k: the object has only 10 bytes") as info:
        s3.get_range("k", 5, 20)
    assert not isinstance(info.value, TransientRemoteError)
    with pytest.raises(RemoteError, match="HTTP 416") as info:
        s3.get_range("k", 15, 20)
    assert not isinstance(info.value, TransientRemoteError)


def test_s3_list_put_delete(s3):
    keys = ["a/b", "a-b", "a.txt", "a/c/d", "b", "ab/x"]
    for key in keys:
        s3.put(key, key.encode())
    assert [i.key for i in s3.list()] == sorted(keys)
    assert [i.key for i in s3.list("a")] == sorted(k for k in keys if k.startswith("a"))
    assert [i.key for i in s3.list("a/")] == ["a/b", "a/c/d"]
    assert [i.key for i in s3.list("a/c")] == ["a/c/d"]
    assert [(i.size, bool(i.etag)) for i in s3.list("a/c/")] == [(5, True)]
    s3.delete("a/b")
    s3.delete("a/b")
    assert [i.key for i in s3.list("a/")] == ["a/c/d"]


def test_s3_refuses_hostile_keys(s3):
    for key in ("../x", "/abs", "a//b", ""):
        with pytest.raises(ShardstoreError, match="not a plain relative key|empty"):
            s3.put(key, b"x")


def test_s3_client_pickles_and_is_thread_safe(s3):
    data = os.urandom(2**20)
    s3.put("k", data)
    again = pickle.loads(pickle.dumps(s3))
    assert again.url == s3.url and again.get_range("k", 10, 20) == data[10:20]
    parts = [(i * 65536, (i + 1) * 65536) for i in range(16)]
    results: dict[int, bytes] = {}

    def read(i: int) -> None:
        results[i] = again.get_range("k", *parts[i])

    threads = [threading.Thread(target=read, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert b"".join(results[i] for i in range(16)) == data


def _child_reads(client: ObstoreClient, fresh_url: str | None) -> str:
    """In a forked child: what reading through ``client`` (or a client opened there) gives, within 20 s."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        try:
            reader = client if fresh_url is None else open_client(fresh_url)
            answer = f"ok {reader.get_range('k', 0, 3)!r}"
        except BaseException as error:  # noqa: BLE001 - the answer is what the child saw
            answer = f"{type(error).__name__}: {error}"
        os.write(write_fd, answer.encode())
        os._exit(0)
    os.close(write_fd)
    try:
        deadline = time.monotonic() + 20
        while not os.waitpid(pid, os.WNOHANG)[0]:
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return "hangs"
            time.sleep(0.01)
        return os.read(read_fd, 4096).decode()
    finally:
        os.close(read_fd)


def test_s3_in_a_child_forked_after_requests_fails_at_once_instead_of_hanging(s3, monkeypatch):
    s3.put("k", b"abcdef")                                          # the parent has now sent requests
    for fresh in (None, s3.url):
        answer = _child_reads(s3, fresh)
        assert answer.startswith("ShardstoreError: s3://shardstore-test/") and \
            "cannot run in a process fork()-ed after its parent sent some" in answer and \
            "multiprocessing_context='spawn'" in answer, answer
    assert s3.get_range("k", 0, 3) == b"abc"                        # the parent is unaffected


def test_s3_in_a_child_forked_before_any_request_works(s3):
    s3.put("k", b"abcdef")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from test_clients import _child_reads; "
            "from shardstore.remote.clients import open_client; "
            "print(_child_reads(open_client(sys.argv[2]), None))")
    done = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), s3.url],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.stdout.strip() == "ok b'abc'", done.stdout + done.stderr


def test_s3_endpoint_from_storage_options(s3_endpoint, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    client = open_client(f"s3://{BUCKET}/opts", {"endpoint": s3_endpoint, "access_key_id": "testing",
                                                 "secret_access_key": "testing"})
    client.put("k", b"v")
    assert client.get("k") == b"v"
    assert pickle.loads(pickle.dumps(client)).get("k") == b"v"


def test_s3_unknown_storage_option_is_a_config_error(s3_endpoint):
    with pytest.raises(ConfigError, match=r"^s3://b-x/p: the storage options are not valid: .*'regoin'"):
        open_client("s3://b-x/p", {"regoin": "eu-west-1"})


# ---- s3:// against a faulty server: error mapping, and no retries inside obstore ----


class FaultyS3:
    """An HTTP server that answers every request the same faulty way, and counts the requests."""

    def __init__(self, mode: str) -> None:
        self.mode, self.requests = mode, 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                self.do_GET()

            def do_GET(self) -> None:
                outer.requests += 1
                if outer.mode in ("503", "403"):
                    code = {"503": "SlowDown", "403": "AccessDenied"}[outer.mode]
                    body = f"<Error><Code>{code}</Code><Message>nope</Message></Error>".encode()
                    self.send_response(int(outer.mode))
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                start, end = map(int, self.headers["Range"].split("=")[1].split("-"))
                half = (end - start + 1) // 2
                self.send_response(206)
                self.send_header("ETag", '"e"')
                self.send_header("Last-Modified", "Mon, 30 Nov 2026 08:00:00 GMT")
                if outer.mode == "short":           # a whole 206 that holds half of the range asked
                    self.send_header("Content-Range", f"bytes {start}-{start + half - 1}/1000")
                    self.send_header("Content-Length", str(half))
                    self.end_headers()
                    self.wfile.write(b"x" * half)
                else:                               # "cut": the range asked, but the connection drops halfway
                    self.send_header("Content-Range", f"bytes {start}-{end}/1000")
                    self.send_header("Content-Length", str(end - start + 1))
                    self.end_headers()
                    self.wfile.write(b"x" * half)
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        # polls every 0.05 s: shutdown() waits one poll
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_port}"

    def client(self) -> ObstoreClient:
        return ObstoreClient("s3://bkt/p", {"endpoint": self.endpoint, "access_key_id": "k",
                                            "secret_access_key": "s", "client_options": {"timeout": "5s"}})

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def faulty(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    servers: list[FaultyS3] = []
    yield lambda mode: servers.append(FaultyS3(mode)) or servers[-1]
    for server in servers:
        server.close()


def test_slow_down_is_transient_and_obstore_does_not_retry_it(faulty):
    server = faulty("503")
    client = server.client()
    with pytest.raises(TransientRemoteError, match=r"^GET \[0, 100\) s3://bkt/p/k: HTTP 503 SlowDown: nope$"):
        client.get_range("k", 0, 100)
    assert server.requests == 1
    sleeps: list[float] = []
    with pytest.raises(RemoteError, match=r"^GET s3://bkt/p/k: failed after 3 attempts; last cause: "
                                          r"TransientRemoteError: GET \[0, 100\) s3://bkt/p/k: HTTP 503 SlowDown"):
        call_with_retries(lambda: client.get_range("k", 0, 100), what="GET s3://bkt/p/k",
                          policy=RetryPolicy(attempts=3), sleep=sleeps.append)
    assert server.requests == 4 and len(sleeps) == 2


def test_short_body_is_transient(faulty):
    client = faulty("short").client()
    with pytest.raises(TransientRemoteError, match=r"^GET \[0, 100\) s3://bkt/p/k: .*Requested 0\.\.100, got 0\.\.50"):
        client.get_range("k", 0, 100)


def test_a_body_cut_short_is_transient(faulty):
    client = faulty("cut").client()
    with pytest.raises(TransientRemoteError, match=r"^GET \[0, 100\) s3://bkt/p/k: .*body error"):
        client.get_range("k", 0, 100)


def test_access_denied_is_not_transient(faulty):
    with pytest.raises(RemoteError, match=r"s3://bkt/p/k: access denied \(HTTP 403 AccessDenied") as info:
        faulty("403").client().get_range("k", 0, 10)
    assert not isinstance(info.value, TransientRemoteError)


def test_connection_refused_is_transient(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with socket.socket() as sock:              # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = ObstoreClient("s3://bkt/p", {"endpoint": f"http://127.0.0.1:{port}", "access_key_id": "k",
                                          "secret_access_key": "s"})
    with pytest.raises(TransientRemoteError, match=r"^HEAD s3://bkt/p/k: .*error sending request"):
        client.head("k")
