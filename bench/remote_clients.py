"""Which S3 client to read shards with: obstore (``ObstoreClient``), boto3 and s3fs against one local S3 server.

``obstore`` is ``ObstoreClient.get_range`` (a ``bytes`` copy of the received buffer), ``obstore-view`` its
``get_range_view`` (no copy); ``http.client`` is unsigned keep-alive GETs with no client library.

A script, not a pytest benchmark: ``python bench/remote_clients.py [--size-mib 64] [--s3fs-path DIR]``.
It starts moto's S3 server on 127.0.0.1 in its own process (in this process its Python request handling would
compete with the clients for the GIL), uploads one object, then runs each client in a fresh process and prints
a markdown table:

- ranged GET throughput: the whole object as ``--part-mib`` parts on ``--threads`` threads (MB/s, median of
  ``--rounds``), and the client process's CPU seconds per GB read (user + system, all its threads);
- latency of HEAD and of a 128-byte ranged GET, one at a time (median ms of ``--latency-n``);
- resident memory and thread count of the client process after the runs;
- fork: whether a ``fork()``-ed child can use the client it inherited, and a client it opens itself (a
  child is killed after 10 s and reported as hanging).

moto serves every byte through Python, so the server sets the throughput ceiling: the ``http.client`` row
(unsigned keep-alive GETs, no client library) measures that ceiling in the same run, and the ratios to it
compare the clients. s3fs drags in aiobotocore, which pins botocore; to keep the project's environment as it
is, install it elsewhere (``pip install --target DIR s3fs``) and pass ``--s3fs-path DIR``.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BUCKET = "bench-bucket"
KEY = "shard_000000/images.npy"
CLIENTS = ("http.client", "obstore", "obstore-view", "boto3", "s3fs")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server() -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, wait_for(proc, port)


def serve_file(path: str, port: int) -> None:
    """A minimal S3 stand-in: HEAD and ranged GET of ``/BUCKET/KEY`` answered from ``path`` with sendfile.

    It checks no signature and keeps no state; the bytes go from the page cache to the socket without
    passing through Python, so unlike moto it is not what limits the clients.
    """
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    size = os.path.getsize(path)
    etag = f'"{os.stat(path).st_ino:x}{size:x}"'

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def answer(self, body: bool) -> None:
            if self.path.split("?")[0] != f"/{BUCKET}/{KEY}":
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start, end = 0, size
            ranged = self.headers.get("Range")
            if ranged:
                first, last = ranged.removeprefix("bytes=").split("-")
                start, end = int(first), min(int(last) + 1, size)
            self.send_response(206 if ranged else 200)
            self.send_header("Content-Length", str(end - start))
            if ranged:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
            self.send_header("ETag", etag)
            self.send_header("Last-Modified", "Mon, 30 Nov 2026 08:00:00 GMT")
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            self.wfile.flush()
            if body:
                with open(path, "rb") as f:
                    offset = start
                    while offset < end:
                        offset += os.sendfile(self.connection.fileno(), f.fileno(), offset, end - offset)

        def setup(self) -> None:
            super().setup()
            # headers and body go in two writes: without NODELAY, Nagle holds the second one back until the
            # client's delayed ACK (40 ms) of the first
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def do_HEAD(self) -> None:
            self.answer(body=False)

        def do_GET(self) -> None:
            self.answer(body=True)

    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


def start_file_server(path: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--serve", path, "--port", str(port)])
    return proc, wait_for(proc, port)


def wait_for(proc: subprocess.Popen, port: int) -> str:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the S3 server did not start within 30 s")


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def thread_count() -> int:
    return len(os.listdir("/proc/self/task"))


# ---- one client, in its own process -------------------------------------------------------------------------


def make_client(name: str, endpoint: str):
    """``(get_range(start, end) -> bytes, head() -> int, reopen() -> a fresh pair)`` for ``name``."""
    if name == "http.client":
        import threading
        host, port = endpoint.removeprefix("http://").split(":")
        local = threading.local()

        def conn() -> http.client.HTTPConnection:
            if getattr(local, "conn", None) is None or local.pid != os.getpid():
                local.conn, local.pid = http.client.HTTPConnection(host, int(port), timeout=30), os.getpid()
            return local.conn

        def get_range(start: int, end: int) -> bytes:
            c = conn()
            c.request("GET", f"/{BUCKET}/{KEY}", headers={"Range": f"bytes={start}-{end - 1}"})
            response = c.getresponse()
            data = response.read()
            assert response.status == 206, response.status
            return data

        def head() -> int:
            c = conn()
            c.request("HEAD", f"/{BUCKET}/{KEY}")
            response = c.getresponse()
            response.read()
            return int(response.headers["Content-Length"])

    elif name in ("obstore", "obstore-view"):
        from shardstore.remote.clients import open_client

        client = open_client(f"s3://{BUCKET}")
        read = client.get_range if name == "obstore" else client.get_range_view

        def get_range(start: int, end: int) -> bytes:
            return read(KEY, start, end)

        def head() -> int:
            return client.head(KEY).size

    elif name == "boto3":
        import boto3
        from botocore.config import Config

        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          config=Config(max_pool_connections=16, retries={"max_attempts": 1}))

        def get_range(start: int, end: int) -> bytes:
            return s3.get_object(Bucket=BUCKET, Key=KEY, Range=f"bytes={start}-{end - 1}")["Body"].read()

        def head() -> int:
            return s3.head_object(Bucket=BUCKET, Key=KEY)["ContentLength"]

    elif name == "s3fs":
        import s3fs

        fs = s3fs.S3FileSystem(key="testing", secret="testing", use_listings_cache=False,
                               client_kwargs={"endpoint_url": endpoint, "region_name": "us-east-1"})
        path = f"{BUCKET}/{KEY}"

        def get_range(start: int, end: int) -> bytes:
            return fs.cat_file(path, start=start, end=end)

        def head() -> int:
            return fs.info(path, refresh=True)["size"]

    else:
        raise SystemExit(f"unknown client {name!r}; choose from {', '.join(CLIENTS)}")
    return get_range, head, lambda: make_client(name, endpoint)


def fork_check(get_range, reopen) -> tuple[str, str]:
    """In a forked child: can the inherited client read? can a client opened in the child read?"""
    results = []
    for use_fresh in (False, True):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: answer within 10 s or be killed
            os.close(read_fd)
            try:
                fn = reopen()[0] if use_fresh else get_range
                verdict = "ok" if len(fn(0, 128)) == 128 else "short read"
            except BaseException as error:  # noqa: BLE001 - any failure is the answer
                verdict = f"error: {type(error).__name__}"
            os.write(write_fd, verdict.encode()[:200])
            os._exit(0)
        os.close(write_fd)
        deadline = time.monotonic() + 10
        verdict = "hangs"
        while time.monotonic() < deadline:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                verdict = os.read(read_fd, 200).decode() or "died"
                break
            time.sleep(0.02)
        else:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(read_fd)
        results.append(verdict)
    return results[0], results[1]


def run_worker(args: argparse.Namespace) -> None:
    base_rss, base_threads = rss_mib(), thread_count()
    get_range, head, reopen = make_client(args.worker, args.endpoint)
    size = head()
    part = args.part_mib * 2**20
    ranges = [(start, min(start + part, size)) for start in range(0, size, part)]

    with ThreadPoolExecutor(args.threads) as pool:
        digest = hashlib.sha256()
        for part_bytes in pool.map(lambda r: get_range(*r), ranges):  # warm-up, and the bytes checked
            digest.update(part_bytes)
        assert digest.hexdigest() == args.sha256, "wrong bytes"
        speeds, cpu0 = [], time.process_time()
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            for part_bytes in pool.map(lambda r: get_range(*r), ranges):
                assert len(part_bytes) == min(part, size)  # each part dropped as it comes, as a writer would
            speeds.append(size / (time.perf_counter() - t0) / 1e6)
        cpu_per_gb = (time.process_time() - cpu0) / (size * args.rounds / 1e9)

    def median_ms(fn) -> float:
        times = []
        for _ in range(args.latency_n):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    head_ms = median_ms(head)
    small_ms = median_ms(lambda: get_range(4096, 4096 + 128))
    rss, threads = rss_mib(), thread_count()
    inherited, fresh = fork_check(get_range, reopen)
    print(json.dumps({"client": args.worker, "mb_s": statistics.median(speeds), "mb_s_all": speeds,
                      "cpu_s_per_gb": cpu_per_gb, "head_ms": head_ms, "get128_ms": small_ms,
                      "rss_mib": rss, "rss_added_mib": rss - base_rss, "threads": threads,
                      "threads_added": threads - base_threads, "fork_inherited": inherited, "fork_fresh": fresh}))


# ---- the driver -----------------------------------------------------------------------------------------------


def run_clients(args: argparse.Namespace, endpoint: str, digest: str) -> tuple[list[dict], list[str]]:
    rows, notes = [], []
    for name in args.clients.split(","):
        env = dict(os.environ)
        if name == "s3fs" and args.s3fs_path:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [args.s3fs_path, env.get("PYTHONPATH")]))
        command = [sys.executable, __file__, "--worker", name, "--endpoint", endpoint, "--sha256", digest,
                   "--part-mib", str(args.part_mib), "--threads", str(args.threads),
                   "--rounds", str(args.rounds), "--latency-n", str(args.latency_n)]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, check=False)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            notes.append(f"- {name}: skipped ({last})")
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return rows, notes


def print_table(title: str, rows: list[dict], notes: list[str]) -> None:
    ceiling = next((r["mb_s"] for r in rows if r["client"] == "http.client"), None)
    print(f"\n{title}\n")
    print("| client | MB/s | of http.client | CPU s/GB | HEAD ms | 128 B GET ms | RSS MiB (+) | threads (+) "
          "| fork: inherited | fork: new client |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        ratio = f"{r['mb_s'] / ceiling:.2f}" if ceiling else "-"
        print(f"| {r['client']} | {r['mb_s']:.0f} | {ratio} | {r['cpu_s_per_gb']:.2f} | {r['head_ms']:.2f} "
              f"| {r['get128_ms']:.2f} | {r['rss_mib']:.0f} (+{r['rss_added_mib']:.0f}) "
              f"| {r['threads']} (+{r['threads_added']}) | {r['fork_inherited']} | {r['fork_fresh']} |")
    for note in notes:
        print(note)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--part-mib", type=int, default=8)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency-n", type=int, default=50)
    parser.add_argument("--clients", default=",".join(CLIENTS))
    parser.add_argument("--servers", default="moto,sendfile", help="moto, sendfile or both (comma-separated)")
    parser.add_argument("--s3fs-path", help="a directory holding s3fs (pip install --target DIR s3fs)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    parser.add_argument("--sha256", help=argparse.SUPPRESS)
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve_file(args.serve, args.port)
        return
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    os.environ.pop("AWS_PROFILE", None)
    if args.worker:
        os.environ["AWS_ENDPOINT_URL"] = args.endpoint
        run_worker(args)
        return

    data = os.urandom(args.size_mib * 2**20)
    digest = hashlib.sha256(data).hexdigest()
    shape = (f"{args.size_mib} MiB object, {args.part_mib} MiB ranged GETs on {args.threads} threads (median of "
             f"{args.rounds}); latency median of {args.latency_n}; server and clients on 127.0.0.1, "
             f"{os.cpu_count()} CPUs")
    for kind in args.servers.split(","):
        if kind == "moto":
            import boto3

            server, endpoint = start_server()
            try:
                s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
                s3.create_bucket(Bucket=BUCKET)
                s3.put_object(Bucket=BUCKET, Key=KEY, Body=data, ACL="public-read")  # http.client reads unsigned
                rows, notes = run_clients(args, endpoint, digest)
            finally:
                server.terminate()
                server.wait(10)
            print_table(f"moto's S3 server (Python; it, not the client, sets the pace). {shape}", rows, notes)
        elif kind == "sendfile":
            import tempfile

            with tempfile.NamedTemporaryFile(prefix="bench-object-") as f:
                f.write(data)
                f.flush()
                server, endpoint = start_file_server(f.name)
                try:
                    rows, notes = run_clients(args, endpoint, digest)
                finally:
                    server.terminate()
                    server.wait(10)
            print_table(f"sendfile stand-in (no signature check; bytes go page cache -> socket). {shape}",
                        rows, notes)
        else:
            raise SystemExit(f"unknown server {kind!r}; use moto or sendfile")


if __name__ == "__main__":
    main()
