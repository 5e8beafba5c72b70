"""Training from a cache in object storage: the local benchmarks' 15-of-N-shard epoch, read from moto's S3 server
through the fault proxy with its bandwidth capped, against a link ceiling and the local disk measured in the same run.

The server side (``S3Server`` and ``FaultProxy`` from ``tests/remote``) runs in a child process
(``python bench/test_remote_bench.py serve``, one JSON command per line on its stdin), so that its Python request
handling does not take this process's GIL from the loader; on a machine with few cores it still shares the CPUs,
which the CPU seconds in ``extra_info`` show (this process's by thread role, and the server's).

The cache: SHARDSTORE_BENCH_REMOTE_SHARDS (64) shards of SHARDSTORE_BENCH_REMOTE_SAMPLES (512) random uint8
3x64x64 images and int64 labels (12,296 bytes a sample), written and uploaded once per module. An epoch is
``min(15, shards)`` shards (``RandomShardSubsetCachedDataset``, seed 42) in batches of 64 through
``ShardLoader(num_threads=2)``; a round (``benchmark.pedantic``, one round) is one epoch. The proxy is capped at
SHARDSTORE_BENCH_REMOTE_MBPS (200) MB/s; a remote store has ``prefetch_shards`` SHARDSTORE_BENCH_REMOTE_PREFETCH
(8), a new empty ``local_cache`` and a ``cache_limit`` that holds the whole cache (nothing is evicted).

- ``test_link``: the link ceiling: one ranged GET through the capped proxy, with the client the cache uses, of
  an object as large as an epoch's shard files; beside it, where a shortfall comes from (the epoch's files on 4
  streams, the cap off, moto without the proxy).
- ``test_local_epoch``: the same epoch from the local copy, its files dropped from the page cache (``disk``) or
  in it (``page-cache``), the consumer counting only.
- ``test_cold_epoch``: epoch 0 from the bucket into the empty local cache, the consumer counting only: MB/s
  against the link; proxy body bytes of the epoch's shard files over their size; requests per shard. With the cap
  off (``uncapped``): what the client, the cache and the loader reach on this machine.
- ``test_next_epoch``: a consumer slowed (it checksums each batch, then sleeps out its period) to
  SHARDSTORE_BENCH_REMOTE_DEMAND (0.8) of the link ceiling: epoch 0 untimed (the prefetcher runs ahead into
  epoch 1 while it drains), then epoch 1 (the round): the wait share (``loader.stats.epoch_s`` / epoch time) and
  its part spent on object storage (``remote_s``); the same from the local copy beside it.

Speed is reported, never asserted; every epoch's batches are asserted equal to the local store's (labels, and
image bytes by CRC-32). MB is 10**6 bytes. Figures go to ``benchmark.extra_info`` (``--benchmark-json``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import traceback
import zlib
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from shardstore import ShardStore, ShardWriter, build_manifest

REPO = Path(__file__).resolve().parent.parent


def _env(name: str, default: float, kind: type = int) -> Any:
    value = kind(os.environ.get(name, default))
    if value <= 0:
        raise pytest.UsageError(f"{name} must be positive, got {value}")
    return value


SHARDS = _env("SHARDSTORE_BENCH_REMOTE_SHARDS", 64)
SAMPLES = _env("SHARDSTORE_BENCH_REMOTE_SAMPLES", 512)
CAP_MBPS = _env("SHARDSTORE_BENCH_REMOTE_MBPS", 200.0, float)
PREFETCH = _env("SHARDSTORE_BENCH_REMOTE_PREFETCH", 8)
DEMAND = _env("SHARDSTORE_BENCH_REMOTE_DEMAND", 0.8, float)
SHARDS_PER_EPOCH = min(15, SHARDS)
IMAGE_SHAPE = (3, 64, 64)
BATCH_SIZE = 64
BATCH_BYTES = BATCH_SIZE * (int(np.prod(IMAGE_SHAPE)) + 8)
SEED = 42
BUCKET, PREFIX = "shardstore-bench", "cache"
SAMPLE_STRIDE = 4099  # a loader-bound consumer checksums every 4099th image byte (a few µs a batch)
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true", "AWS_EC2_METADATA_DISABLED": "true"}

#: figures of earlier tests of this module, for later tests' ratios (absent when a test was deselected)
MEASURED: dict[str, float] = {}


# -- the server process ---------------------------------------------------------------------------------


def serve() -> None:
    """Child process: moto's S3 server and the fault proxy; one JSON command per stdin line, one answer per line."""
    sys.path.insert(0, str(REPO))
    from tests.remote.s3server import CREDENTIALS, FaultProxy, S3Server

    os.environ.update(CREDENTIALS)
    with S3Server() as s3, FaultProxy(s3.endpoint) as proxy:
        print(json.dumps({"endpoint": proxy.endpoint, "direct": s3.endpoint}), flush=True)
        for line in sys.stdin:
            cmd = json.loads(line)
            out: dict[str, Any] = {}
            try:
                if cmd["op"] == "upload":
                    s3.create_bucket(cmd["bucket"])
                    out["keys"] = len(s3.upload_tree(cmd["dir"], cmd["bucket"], cmd["prefix"]))
                elif cmd["op"] == "put":
                    body = np.random.default_rng(7).bytes(cmd["size"])
                    s3.boto3_client().put_object(Bucket=cmd["bucket"], Key=cmd["key"], Body=body)
                elif cmd["op"] == "cap":
                    proxy.bandwidth = cmd["bytes_per_s"]
                elif cmd["op"] == "reset":
                    proxy.reset()
                elif cmd["op"] == "stats":
                    out["keys"] = {k: {"body_bytes": v.body_bytes, "heads": v.count("HEAD"), "gets": v.count("GET"),
                                       "errors": v.count() - v.count(status=200) - v.count(status=206)}
                                   for k, v in proxy.stats().items()}
                elif cmd["op"] != "cpu":
                    raise ValueError(f"unknown command {cmd['op']!r}")
                times = os.times()
                out["cpu_s"] = times.user + times.system
            except Exception:  # noqa: BLE001 - raised in the parent
                out = {"error": traceback.format_exc()}
            print(json.dumps(out), flush=True)


class Server:
    """The child process serving the bucket through the capped proxy; ``call(op, ...)`` runs one command."""

    def __init__(self) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen([sys.executable, __file__, "serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=REPO, env=env)
        hello = self._answer()
        self.endpoint: str = hello["endpoint"]  # the proxy
        self.direct: str = hello["direct"]      # moto's server itself

    def _answer(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"the S3 server process exited with {self.proc.wait()}")
        out = json.loads(line)
        if "error" in out:
            raise AssertionError(f"the S3 server process failed:\n{out['error']}")
        return out

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def cap(self, on: bool) -> None:
        self.call("cap", bytes_per_s=CAP_MBPS * 1e6 if on else None)

    def cpu_s(self) -> float:
        return float(self.call("cpu")["cpu_s"])

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# -- the cache, its bucket and its epochs ----------------------------------------------------------------


@dataclass
class Bench:
    """The local copy, its bucket, and what each epoch reads."""

    root: Path
    server: Server
    tmp: Path
    files: dict[int, list[Path]] = field(default_factory=dict)        # epoch -> its shard files, visit order
    references: dict[int, Result] = field(default_factory=dict)       # epoch -> the local store's batches
    caches: Iterator[int] = field(default_factory=lambda: iter(range(10**6)))

    def files_of(self, epoch: int) -> list[Path]:
        if epoch not in self.files:
            ds = dataset(ShardStore.open(self.root))
            ds.set_epoch(epoch)
            m = ds.store.manifest
            where = {int(shard_id): p for p, shard_id in enumerate(m.ids)}
            self.files[epoch] = [self.root / m.file_path(where[int(s)], name)
                                 for s in ds.selected_shards for name in m.fields]
        return self.files[epoch]

    def epoch_bytes(self, epoch: int) -> int:
        return sum(p.stat().st_size for p in self.files_of(epoch))

    def key(self, path: Path) -> str:
        """The proxy's name for a file of the local copy."""
        return f"{BUCKET}/{PREFIX}/{path.relative_to(self.root).as_posix()}"

    def remote_store(self) -> ShardStore:
        """A store over the bucket with a new, empty local cache."""
        total = sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())
        return ShardStore.open(f"s3://{BUCKET}/{PREFIX}", local_cache=self.tmp / f"node{next(self.caches)}",
                               cache_limit=int(total * 1.2) + (64 << 20), prefetch_shards=PREFETCH)

    def reference(self, epoch: int) -> Result:
        if epoch not in self.references:
            with loader_of(ShardStore.open(self.root)) as loader:
                self.references[epoch] = run_epoch(loader, epoch, full=True)
        return self.references[epoch]


def dataset(store: ShardStore) -> Any:
    # imported here (it imports torch): the server process imports this module too
    from shardstore.dataset.subset import RandomShardSubsetCachedDataset

    return RandomShardSubsetCachedDataset(store, SHARDS_PER_EPOCH, SEED, batch_size=BATCH_SIZE)


def loader_of(store: ShardStore) -> Any:
    from shardstore.loader import ShardLoader

    return ShardLoader(dataset(store), num_threads=2)


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bench]:
    tmp = tmp_path_factory.mktemp("remote")
    root = tmp / "cache"
    rng = np.random.default_rng(1)
    with ShardWriter(root, shard_size=SAMPLES, fsync=False) as writer:
        for _ in range(SHARDS):  # fresh random bytes per shard: nothing shared, nothing compresses
            images = np.frombuffer(rng.bytes(SAMPLES * int(np.prod(IMAGE_SHAPE))), np.uint8)
            writer.add_batch({"images": images.reshape(SAMPLES, *IMAGE_SHAPE),
                              "labels": rng.integers(0, 1000, SAMPLES, dtype=np.int64)})
    build_manifest(root)
    os.sync()
    server = Server()
    try:
        server.call("upload", dir=str(root), bucket=BUCKET, prefix=PREFIX)
        server.cap(True)
        with pytest.MonkeyPatch.context() as mp:
            for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT"):
                mp.delenv(name, raising=False)
            for name, value in {**AWS_ENV, "AWS_ENDPOINT_URL": server.endpoint}.items():
                mp.setenv(name, value)
            yield Bench(root, server, tmp)
    finally:
        server.close()


# -- measuring --------------------------------------------------------------------------------------------


@dataclass
class Result:
    """One epoch as its consumer saw it."""

    seconds: float
    wait_s: float
    first_wait_s: float   # the first batch's wait (a cold epoch's first shard)
    remote_s: float
    labels: np.ndarray
    sampled: list[int]    # per batch: CRC-32 of every SAMPLE_STRIDE-th image byte
    checksums: list[int]  # per batch: CRC-32 of all its image bytes (``full`` epochs only)
    cpu_s: dict[str, float]

    def figures(self, nbytes: int) -> dict[str, Any]:
        return {"seconds": round(self.seconds, 3), "samples_per_s": round(self.labels.size / self.seconds),
                "MBps": round(nbytes / self.seconds / 1e6, 1), "wait_share": round(self.wait_s / self.seconds, 4),
                "wait_s": round(self.wait_s, 3),
                "first_batch_wait_s": round(self.first_wait_s, 3), "remote_s": round(self.remote_s, 3),
                "local_s": round(self.wait_s - self.remote_s, 3), "cpu_s": self.cpu_s}


#: thread-name prefixes of this process's threads, by role; the rest are native threads (the client's runtime)
ROLES = (("MainThread", "consumer"), ("shardstore-fill", "loader fillers"), ("shardstore-pager", "loader pager"),
         ("shardstore-prefetch", "prefetchers"), ("shardstore-fetch", "download pool"))


def thread_cpu() -> Counter[str]:
    """CPU seconds of this process's live threads by role, and of the whole process (``process``)."""
    tick = os.sysconf("SC_CLK_TCK")
    names = {t.native_id: t.name for t in threading.enumerate()}
    out: Counter[str] = Counter()
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        name = names.get(int(tid), "")
        role = next((r for prefix, r in ROLES if name.startswith(prefix)), "native threads")
        out[role] += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    times = os.times()
    out["process"] = times.user + times.system
    return out


def run_epoch(loader: Any, epoch: int, *, period_s: float = 0.0, full: bool = False) -> Result:
    """One epoch through ``loader``, from ``set_epoch`` to its last batch. The consumer keeps the labels and
    checksums the images (``full``: every byte, else a sample); with ``period_s`` it then sleeps out that period."""
    cpu0, remote0 = thread_cpu(), loader.stats.remote_s
    labels, sampled, sums = [], [], []
    start = time.perf_counter()
    loader.set_epoch(epoch)
    for batch in loader:
        got = time.perf_counter()
        labels.append(batch["labels"].numpy().copy())
        images = batch["images"].numpy()
        sampled.append(zlib.crc32(np.ascontiguousarray(images.reshape(-1)[::SAMPLE_STRIDE])))
        if full:
            sums.append(zlib.crc32(images))
        if period_s and (left := period_s - (time.perf_counter() - got)) > 0:
            time.sleep(left)
    seconds = time.perf_counter() - start
    cpu = thread_cpu()
    cpu.subtract(cpu0)
    waits = loader.stats.per_batch_s
    return Result(seconds, loader.stats.epoch_s, float(waits[0]), loader.stats.remote_s - remote0,
                  np.concatenate(labels), sampled, sums, {k: round(v, 2) for k, v in cpu.items()})


def check_same(got: Result, want: Result) -> None:
    """``got``'s batches are the local store's: labels, and image bytes by checksum."""
    np.testing.assert_array_equal(got.labels, want.labels)
    assert got.sampled == want.sampled, "image bytes differ from the local store's"
    assert not got.checksums or got.checksums == want.checksums, "image bytes differ from the local store's"


def ratio(value: float, base: float | None, target: float | None = None, lower_is_better: bool = False
          ) -> dict[str, Any] | None:
    if not base:
        return None
    r = value / base
    met = None if target is None else bool(r <= target if lower_is_better else r >= target)
    return {"value": round(r, 3), "target": target, "met": met}


def proxy_figures(bench: Bench, epoch: int, stats: dict[str, dict[str, int]]) -> dict[str, Any]:
    """What came through the proxy for ``epoch``'s shard files, and for any other key (the next epoch's shards)."""
    sizes = {bench.key(p): p.stat().st_size for p in bench.files_of(epoch)}
    mine = [v for k, v in stats.items() if k in sizes]
    fetched = sum(v["body_bytes"] for v in mine)
    shards = len(sizes) // 2
    return {"epoch_shard_MB": round(sum(sizes.values()) / 1e6, 3), "fetched_MB": round(fetched / 1e6, 3),
            "fetched_over_epoch_bytes": ratio(fetched, sum(sizes.values()), 1.05, lower_is_better=True),
            "requests_per_shard": round(sum(v["heads"] + v["gets"] for v in mine) / shards, 2),
            "heads_per_shard": round(sum(v["heads"] for v in mine) / shards, 2),
            "gets_per_shard": round(sum(v["gets"] for v in mine) / shards, 2),
            "error_answers": sum(v["errors"] for v in stats.values()),
            "other_keys_MB": round(sum(v["body_bytes"] for k, v in stats.items() if k not in sizes) / 1e6, 3)}


def get_objects(client: Any, objects: list[tuple[str, int]], streams: int, server: Server) -> dict[str, float]:
    """Each object in one ranged GET, ``streams`` at a time: MB/s, and CPU seconds here and in the server."""
    size = sum(n for _, n in objects)
    cpu0, server0 = thread_cpu()["process"], server.cpu_s()
    start = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        got = sum(pool.map(lambda job: len(client.get_range(job[0], 0, job[1])), objects))
    seconds = time.perf_counter() - start
    assert got == size
    return {"MBps": round(size / seconds / 1e6, 1), "seconds": round(seconds, 3),
            "cpu_s": round(thread_cpu()["process"] - cpu0, 2), "server_cpu_s": round(server.cpu_s() - server0, 2)}


# -- the benchmarks ------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.benchmark(group="remote epoch")
def test_link(benchmark: BenchmarkFixture, bench: Bench) -> None:
    """The link ceiling (one stream, capped); untimed beside it: the epoch's shard files on 4 streams, the same
    two with the cap off, and moto's server without the proxy."""
    from shardstore.remote.clients import open_client

    server, size = bench.server, bench.epoch_bytes(0)
    server.call("put", bucket=BUCKET, key="link/object", size=size)
    big = [("link/object", size)]
    files = [(f"{PREFIX}/{p.relative_to(bench.root).as_posix()}", p.stat().st_size) for p in bench.files_of(0)]
    client = open_client(f"s3://{BUCKET}")
    client.head("link/object")  # connection made, credentials resolved
    cases: dict[str, dict[str, float]] = {}
    benchmark.pedantic(lambda: cases.__setitem__("capped, 1 stream", get_objects(client, big, 1, server)),
                       rounds=1, iterations=1)
    cases["capped, the epoch's files on 4 streams"] = get_objects(client, files, 4, server)
    server.cap(False)
    try:
        cases["uncapped, 1 stream"] = get_objects(client, big, 1, server)
        cases["uncapped, the epoch's files on 4 streams"] = get_objects(client, files, 4, server)
        direct = open_client(f"s3://{BUCKET}", {"endpoint": server.direct})
        cases["moto without the proxy, 1 stream"] = get_objects(direct, big, 1, server)
    finally:
        server.cap(True)
    MEASURED["link"] = mbps = cases["capped, 1 stream"]["MBps"]
    MEASURED["link 4 streams"] = cases["capped, the epoch's files on 4 streams"]["MBps"]
    MEASURED["uncapped"] = cases["uncapped, the epoch's files on 4 streams"]["MBps"]
    benchmark.extra_info.update(kind="link", object_MB=round(size / 1e6, 3), cap_MBps=CAP_MBPS, link_MBps=mbps,
                                link_over_cap=round(mbps / CAP_MBPS, 3), cases=cases,
                                loadavg=round(os.getloadavg()[0], 2))


@pytest.mark.slow
@pytest.mark.benchmark(group="remote epoch")
@pytest.mark.parametrize("where", ["disk", "page-cache"])
def test_local_epoch(benchmark: BenchmarkFixture, bench: Bench, where: str) -> None:
    from shardstore.pagecache import resident_fraction

    files, want = bench.files_of(0), bench.reference(0)
    loader = loader_of(ShardStore.open(bench.root))
    out: dict[str, Any] = {}

    def setup() -> None:
        for path in files:
            fd = os.open(path, os.O_RDONLY)
            try:
                if where == "disk":
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                else:
                    while os.read(fd, 8 << 20):
                        pass
            finally:
                os.close(fd)
        out["resident"] = float(np.mean([resident_fraction(p) for p in files]))

    try:
        benchmark.pedantic(lambda: out.__setitem__("epoch", run_epoch(loader, 0)), setup=setup, rounds=1,
                           iterations=1)
    finally:
        loader.close()
    check_same(out["epoch"], want)
    figures = out["epoch"].figures(bench.epoch_bytes(0))
    MEASURED[f"local {where}"] = figures["MBps"]
    benchmark.extra_info.update(kind="local", where=where, epoch_MB=round(bench.epoch_bytes(0) / 1e6, 3),
                                resident_fraction=round(out["resident"], 3), **figures,
                                loadavg=round(os.getloadavg()[0], 2))


@pytest.mark.slow
@pytest.mark.benchmark(group="remote epoch")
@pytest.mark.parametrize("link", ["capped", "uncapped"])
def test_cold_epoch(benchmark: BenchmarkFixture, bench: Bench, link: str) -> None:
    want, server = bench.reference(0), bench.server
    state: dict[str, Any] = {}

    def setup() -> None:
        server.cap(link == "capped")
        server.call("reset")
        start = time.perf_counter()
        state["store"] = store = bench.remote_store()
        state["open_s"] = time.perf_counter() - start
        opened = server.call("stats")["keys"]
        state["open"] = {"requests": sum(v["heads"] + v["gets"] for v in opened.values()),
                         "KB": round(sum(v["body_bytes"] for v in opened.values()) / 1e3, 1)}
        state["loader"] = loader_of(store)
        server.call("reset")
        state["server_cpu0"] = server.cpu_s()

    def epoch() -> None:
        state["epoch"] = run_epoch(state["loader"], 0)
        reply = server.call("stats")  # at once: the prefetcher is going on into epoch 1
        state["stats"], state["server_cpu_s"] = reply["keys"], reply["cpu_s"] - state["server_cpu0"]

    try:
        benchmark.pedantic(epoch, setup=setup, rounds=1, iterations=1)
    finally:
        server.cap(True)
        if "loader" in state:
            state["loader"].close()
        if "store" in state:
            state["store"].remote.close()
    got: Result = state["epoch"]
    check_same(got, want)
    nbytes = bench.epoch_bytes(0)
    figures = got.figures(nbytes)
    mbps = nbytes / got.seconds / 1e6
    if link == "capped":
        ratios = {"cold / link ceiling (1 stream)": ratio(mbps, MEASURED.get("link"), 0.85),
                  "cold / the epoch's files on 4 streams": ratio(mbps, MEASURED.get("link 4 streams")),
                  "cold / proxy cap": ratio(mbps, CAP_MBPS, 0.85)}
    else:
        ratios = {"cold / the epoch's files on 4 streams, uncapped": ratio(mbps, MEASURED.get("uncapped"))}
    ratios["cold / local disk"] = ratio(mbps, MEASURED.get("local disk"))
    ratios["cold / local page cache"] = ratio(mbps, MEASURED.get("local page-cache"))
    cache = state["store"].remote.cache.stats  # read after close: includes what was fetched ahead into epoch 1
    benchmark.extra_info.update(
        kind="cold", link=link, epoch_MB=round(nbytes / 1e6, 3), open_s=round(state["open_s"], 3),
        open=state["open"], **figures, ratios={k: v for k, v in ratios.items() if v},
        proxy=proxy_figures(bench, 0, state["stats"]), server_cpu_s=round(state["server_cpu_s"], 2),
        cache={"MB_downloaded": round(cache.bytes_downloaded / 1e6, 3), "shards": cache.shards_downloaded,
               "requests": cache.requests, "retries": cache.retries, "download_s": round(cache.download_s, 3)},
        loadavg=round(os.getloadavg()[0], 2))


@pytest.mark.slow
@pytest.mark.benchmark(group="remote epoch")
@pytest.mark.parametrize("source", ["remote", "local"])
def test_next_epoch(benchmark: BenchmarkFixture, bench: Bench, source: str) -> None:
    wants = {e: bench.reference(e) for e in (0, 1)}
    link = MEASURED.get("link", CAP_MBPS)
    period_s = BATCH_BYTES / (DEMAND * link * 1e6)
    state: dict[str, Any] = {}
    remote = source == "remote"

    def setup() -> None:
        state["store"] = store = bench.remote_store() if remote else ShardStore.open(bench.root)
        state["loader"] = loader = loader_of(store)
        if remote:
            bench.server.call("reset")
        state[0] = run_epoch(loader, 0, period_s=period_s, full=True)
        if remote:
            state["stats0"] = bench.server.call("stats")["keys"]
            state["server_cpu0"] = bench.server.cpu_s()

    def epoch() -> None:
        state[1] = run_epoch(state["loader"], 1, period_s=period_s, full=True)
        if remote:
            reply = bench.server.call("stats")
            state["stats1"], state["server_cpu_s"] = reply["keys"], reply["cpu_s"] - state["server_cpu0"]

    try:
        benchmark.pedantic(epoch, setup=setup, rounds=1, iterations=1)
    finally:
        if "loader" in state:
            state["loader"].close()
        if remote and "store" in state:
            state["store"].remote.close()
    for e in (0, 1):
        check_same(state[e], wants[e])
    info: dict[str, Any] = {"kind": "next epoch", "source": source, "period_ms": round(period_s * 1e3, 3),
                            "demand_MBps": round(BATCH_BYTES / period_s / 1e6, 1), "link_MBps": round(link, 1)}
    for e in (0, 1):
        info[f"epoch{e}"] = state[e].figures(bench.epoch_bytes(e))
    if remote:
        before = state["stats0"]  # epoch 1's own requests: the counts after epoch 0 subtracted
        only1 = {k: {n: x - before.get(k, {}).get(n, 0) for n, x in v.items()} for k, v in state["stats1"].items()}
        info["epoch0"]["proxy"] = proxy_figures(bench, 0, before)
        info["epoch1"]["proxy"] = proxy_figures(bench, 1, only1)
        both = set(bench.files_of(0)) | set(bench.files_of(1))
        fetched = sum(v["body_bytes"] for k, v in state["stats1"].items() if k in {bench.key(p) for p in both})
        info["shards_in_both_epochs"] = len(set(bench.files_of(0)) & set(bench.files_of(1))) // 2
        info["epochs 0-1: fetched / their distinct shard bytes"] = ratio(
            fetched, sum(p.stat().st_size for p in both), 1.05, lower_is_better=True)
        info["server_cpu_s_epoch1"] = round(state["server_cpu_s"], 2)
    info["ratios"] = {"epoch 1 wait share": ratio(state[1].wait_s, state[1].seconds, 0.05, lower_is_better=True)}
    benchmark.extra_info.update(info, loadavg=round(os.getloadavg()[0], 2))


if __name__ == "__main__":
    if sys.argv[1:] != ["serve"]:
        raise SystemExit("usage: python bench/test_remote_bench.py serve  (the S3 server process of the benchmarks)")
    serve()
