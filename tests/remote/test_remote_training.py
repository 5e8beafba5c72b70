"""Training from a cache in object storage, end to end: moto's S3 server behind the fault proxy, rank processes
sharing one node-local cache, DataLoader workers, faults and kills. Every batch is checked against the batch
the same dataset gives on the local-disk store."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shardstore.dataset.subset import RandomShardSubsetCachedDataset
from shardstore.manifest.build import build_manifest
from shardstore.remote.local_cache import BOOKKEEPING
from shardstore.remote.objects import RemoteError
from shardstore.store.reader import ShardStore
from tests.conftest import write_native
from tests.remote.conftest import assert_same, du, read_epochs
from tests.remote.rank_worker import (
    ROOT,
    RankServer,
    batch_digest,
    epoch_digests,
    make_dataset,
)

WORLD = 4

# Every test here runs moto's S3 server and takes from half a second to half a minute on two cores.
pytestmark = pytest.mark.slow


# -- helpers -------------------------------------------------------------------------------------------


@pytest.fixture
def open_remote():
    """``ShardStore.open`` for URLs; the stores' prefetchers are stopped when the test ends."""
    stores: list[ShardStore] = []

    def open_store(url: str, **kwargs: Any) -> ShardStore:
        store = ShardStore.open(url, **kwargs)
        stores.append(store)
        return store

    yield open_store
    for store in stores:
        store.remote.close()
        store.remote.cache.close()


class DuWatcher:
    """Samples ``du(path)`` every ``interval_s`` on a thread until stopped; ``peak`` is the largest sample."""

    def __init__(self, path: Path, interval_s: float = 0.01) -> None:
        self.path, self.interval_s = path, interval_s
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="du-watcher", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.path.exists():
                self.samples.append(du(self.path))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> DuWatcher:  # noqa: PYI034
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak(self) -> int:
        return max(self.samples, default=0)


def write_cache(root: Path, num_shards: int, rows: int) -> Path:
    """A native cache of ``num_shards`` shards of ``rows`` samples (values encode the sample id) with its manifest."""
    write_native(root, num_shards * rows, rows)
    build_manifest(root)
    return root


def source_files(root: Path) -> dict[str, bytes]:
    """Every shard file of a local cache: key (relative path) to its bytes."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.glob("shard_*/*.npy"))}


def rank_config(**values: Any) -> dict[str, Any]:
    config = {"world_size": WORLD, "policy": "permutation", "seed": 5, "num_workers": 2, "context": "fork",
              "prefetch_shards": 4}
    config.update(values)
    return config


def local_digests(root: Path, config: dict[str, Any]) -> dict[str, list[str]]:
    """The batch digests the rank ``config`` describes reads from the local-disk store at ``root``."""
    return epoch_digests(make_dataset(ShardStore.open(root), config), config["epochs"])


def run_ranks(tmp_path: Path, configs: list[dict[str, Any]], timeout_s: float = 120.0) -> list[dict[str, Any]]:
    """Run each config as a fresh ``python -m tests.remote.rank_worker`` with this process's environment."""
    procs = []
    for config in configs:
        path = tmp_path / f"rank{config['rank']}.json"
        path.write_text(json.dumps(config))
        log = open(tmp_path / f"rank{config['rank']}.log", "wb")  # noqa: SIM115 - closed when it exits
        procs.append((subprocess.Popen([sys.executable, "-m", "tests.remote.rank_worker", str(path)], cwd=ROOT,
                                       env=dict(os.environ), stdout=log, stderr=subprocess.STDOUT), log))
    deadline = time.monotonic() + timeout_s
    try:
        for proc, log in procs:
            proc.wait(max(1.0, deadline - time.monotonic()))
            log.close()
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    results = []
    for (proc, _), config in zip(procs, configs):
        text = (tmp_path / f"rank{config['rank']}.log").read_text()
        assert proc.returncode == 0, f"rank {config['rank']} exited with {proc.returncode}:\n{text[-3000:]}"
        results.append(json.loads(Path(config["out"]).read_text()))
    return results


# -- 1. ranks and workers sharing one node-local cache ---------------------------------------------------


def test_four_ranks_with_two_workers_each_fetch_every_shard_once_and_stay_under_the_limit(
        tmp_path: Path, s3_server, s3_proxy, bucket, aws_env) -> None:
    # 48 shards of 512 rows (~28 KiB each on disk); the permutation policy gives each epoch 12 of them and no
    # shard twice in 4 epochs: every file epochs 0-2 read is needed once, so the node fetches it exactly once.
    # The ranks keep step like DDP's all-reduce makes them (a rank far ahead would evict what a slow one still
    # needs: then a refetch is right, and the count below would not hold).
    root = write_cache(tmp_path / "cache", num_shards=48, rows=512)
    files = source_files(root)
    s3_server.upload_tree(root, bucket, "cache")
    node = tmp_path / "node"
    limit = 560 << 10  # about 13 shards besides the manifest: epoch 1 evicts what epoch 0 brought
    barrier = tmp_path / "steps"
    barrier.write_bytes(bytes(8 * WORLD))
    configs = [rank_config(url=f"s3://{bucket}/cache", local_cache=str(node), cache_limit=limit, rank=r,
                           shards_per_epoch=12, batch_size=32, epochs=[0, 1, 2], out=str(tmp_path / f"out{r}.json"),
                           step_barrier=str(barrier))
               for r in range(WORLD)]
    s3_proxy.reset()
    with DuWatcher(node) as watcher:
        results = run_ranks(tmp_path, configs)
    for config, result in zip(configs, results):
        want = local_digests(root, config)
        assert result["batches"] == want, f"rank {config['rank']} read other batches than the local store gives"
        assert [len(want[str(e)]) for e in range(3)] == [12 * 512 // (WORLD * 32)] * 3
    # Epochs 0-2: each file exactly once. Epoch 3's first shards may be fetched ahead while epoch 2 drains.
    ds = make_dataset(ShardStore.open(root), configs[0])
    read = {shard for e in range(3) for shard in ds.set_epoch(e)}
    ahead = set(ds.set_epoch(3)[: configs[0]["prefetch_shards"]])
    stats = s3_proxy.stats()
    sent = {key: getattr(stats.get(f"{bucket}/cache/{key}"), "body_bytes", 0) for key in files}
    shard_of = {key: int(key.split("/")[0].split("_")[1]) for key in files}
    assert {k: n for k, n in sent.items() if shard_of[k] in read and n != len(files[k])} == {}
    assert {k: n for k, n in sent.items() if shard_of[k] not in read | ahead and n} == {}
    assert {k: n for k, n in sent.items() if shard_of[k] in ahead and n not in (0, len(files[k]))} == {}
    print(f"du peak {watcher.peak:,} of {limit:,} over {len(watcher.samples)} samples; "
          f"evictions {[r['cache']['evictions'] for r in results]}; "
          f"downloaded {[r['cache']['shards_downloaded'] for r in results]}")
    assert len(watcher.samples) > 50
    assert watcher.peak <= limit
    assert sum(r["cache"]["evictions"] for r in results) >= 12


# -- 2. ranks killed mid-download ------------------------------------------------------------------------


def temporaries(node: Path) -> list[str]:
    """Downloads in progress (and their placeholders) and receipts being written, in the local cache."""
    book = node / BOOKKEEPING
    tmp = sorted(os.listdir(book / "tmp")) if (book / "tmp").is_dir() else []
    fetched = book / "fetched"
    return tmp + (sorted(n for n in os.listdir(fetched) if n.startswith(".")) if fetched.is_dir() else [])


def of_pid(names: list[str], pid: int) -> list[str]:
    """The temporaries ``pid`` wrote (their names carry the writer's pid between dots)."""
    return [n for n in names if f".{pid}." in n]


def bad_final_files(node: Path, files: dict[str, bytes]) -> list[str]:
    """Files under a final name in the local cache that are not exactly the source's bytes (size, then content)."""
    bad = []
    for key, data in files.items():
        try:
            with open(node / key, "rb") as f:
                got = f.read()
        except FileNotFoundError:
            continue  # not fetched, or evicted
        if len(got) != len(data):
            bad.append(f"{key}: {len(got):,} bytes, the source has {len(data):,}")
        elif got != data:
            bad.append(f"{key}: {len(got):,} bytes that differ from the source's")
    return bad


class FileChecker:
    """Checks every final file against the source on a thread, over and over, until stopped."""

    def __init__(self, node: Path, files: dict[str, bytes]) -> None:
        self.node, self.files = node, files
        self.bad: list[str] = []
        self.scans = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="file-checker", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.bad += bad_final_files(self.node, self.files)
            self.scans += 1
            self._stop.wait(0.02)

    def __enter__(self) -> FileChecker:  # noqa: PYI034
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def wait_for(condition, timeout_s: float, poll_s: float = 0.002) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(poll_s)
    return True


def writer_pid(name: str) -> int | None:
    """The pid a temporary's name carries (``<shard>.<file>.<pid>.<hex>.part``, ``.<shard>.<pid>.<hex>``)."""
    parts = name.removesuffix(".part").split(".")
    return int(parts[-2]) if len(parts) >= 3 and parts[-2].isdigit() else None


def kill_victim(server: RankServer, pids: dict[int, int], victim: int, config: dict[str, Any], node: Path,
                files: dict[str, bytes], rng: random.Random) -> bool | None:
    """Wait for the victim rank to download, SIGKILL it at a random moment, check the cache, restart it.

    Returns whether its download was still in progress at the kill (its temporaries were there), or None
    when it had finished its epochs instead (it is then started again: the cache evicted what it reads first).
    """
    pid = pids[victim]
    time.sleep(rng.uniform(0.0, 0.3))
    if not wait_for(lambda: of_pid(temporaries(node), pid) or not server.running(pid), 30):
        raise AssertionError(f"rank {victim} (pid {pid}) neither downloads nor ends; {server.dump_stacks()}")
    if not server.running(pid):
        assert server.ended_well(pid)
        pids[victim] = server.start(config)
        return None
    time.sleep(rng.uniform(0.0, 0.03))  # a shard takes ~20 ms: land inside its download
    midway = bool(of_pid(temporaries(node), pid))
    os.kill(pid, signal.SIGKILL)
    assert server.wait(pid) == -signal.SIGKILL
    assert bad_final_files(node, files) == []
    pids[victim] = restarted = server.start(config)
    opened = Path(config["out"] + ".opened")
    assert wait_for(lambda: opened.exists() and opened.read_text() == str(restarted), 30)
    # Gone once the restarted rank has opened the store, or, when another process held the shard's lock at that
    # moment (taking the download over, or removing them itself), as soon as that one has.
    assert wait_for(lambda: of_pid(temporaries(node), pid) == [], 2), of_pid(temporaries(node), pid)
    return midway


def test_ranks_killed_mid_download_leave_only_whole_files_and_the_others_finish(
        tmp_path: Path, s3_server, s3_proxy, bucket, aws_env) -> None:
    """SIGKILLs over 3 runs until 30 of them landed while the killed rank had a download in progress.

    The ranks run unsynchronized and the victim restarts from epoch 0, so they drift apart: the limit holds
    what they pin at once (their read-ahead and their workers' maps at different places), about 24 of the
    32 shards, and epochs 2 and 3 evict what the victim reads first.
    """
    root = write_cache(tmp_path / "cache", num_shards=32, rows=512)  # 20 KB a shard, 36 KiB on disk
    files = source_files(root)
    s3_server.upload_tree(root, bucket, "cache")
    s3_proxy.bandwidth = 1e6  # a shard takes ~20 ms to arrive: room to land a kill inside it
    rng = random.Random(20250)
    server = RankServer(tmp_path / "server.log")
    outcomes: list[bool | None] = []
    wanted: dict[int, dict[str, list[str]]] = {}
    try:
        for run in range(3):
            node = tmp_path / f"node{run}"
            victim = (run + 1) % WORLD
            configs = [rank_config(url=f"s3://{bucket}/cache", local_cache=str(node), cache_limit=1000 << 10,
                                   rank=r, shards_per_epoch=8, batch_size=32, epochs=[0, 1, 2, 3], num_workers=1,
                                   out=str(tmp_path / f"run{run}-rank{r}.json")) for r in range(WORLD)]
            with FileChecker(node, files) as checker:
                pids = {r: server.start(c) for r, c in enumerate(configs)}
                midway = 0
                for _ in range(40):  # until 10 kills landed inside a download (whether one did is a matter of
                    # timing on a loaded machine: a kill just after a download ended still checks the cache, and
                    # a victim that finished its epochs is started again instead)
                    outcomes.append(kill_victim(server, pids, victim, configs[victim], node, files, rng))
                    midway += outcomes[-1] is True
                    if midway == 10:
                        break
                for pid in pids.values():  # the others went on; the victim's last start read all its epochs
                    assert server.ended_well(pid, 120)
            assert checker.bad == [] and checker.scans > 10
            left = temporaries(node)
            assert left == [], f"run {run}: left by {[(n, server.exits.get(writer_pid(n))) for n in left]}"
            for config in configs:
                if config["rank"] not in wanted:
                    wanted[config["rank"]] = local_digests(root, config)
                got = json.loads(Path(config["out"]).read_text())["batches"]
                assert got == wanted[config["rank"]], f"run {run}: rank {config['rank']} read other batches"
    finally:
        server.close()
    kills, midway = sum(o is not None for o in outcomes), sum(o is True for o in outcomes)
    print(f"{kills} kills, {midway} with the killed rank's download in progress")
    assert midway == 30 and kills >= midway


# -- 3. faults the retries absorb: 503 SlowDown, a cut body, an object replaced mid-download --------------


def loader_batches(store: ShardStore, epochs: list[int], *, shards_per_epoch: int = 6, seed: int = 3,
                   batch_size: int = 16) -> list[dict[str, np.ndarray]]:
    """Every batch of ``epochs`` as a ``ShardLoader`` (the rank's own threads) reads them, copied."""
    from shardstore.loader.shard_loader import ShardLoader

    ds = RandomShardSubsetCachedDataset(store, shards_per_epoch=shards_per_epoch, random_subset_seed=seed,
                                        batch_size=batch_size)
    with ShardLoader(ds, batch_size=batch_size, num_threads=2) as loader:
        return read_epochs(loader, epochs)


def test_a_third_of_requests_answered_503_slowdown_cost_bounded_retries(
        tmp_path: Path, s3_server, s3_proxy, bucket, aws_env, open_remote) -> None:
    from shardstore.remote.retry import RetryPolicy

    root = write_cache(tmp_path / "cache", num_shards=12, rows=256)
    files = source_files(root)
    s3_server.upload_tree(root, bucket, "cache")
    s3_proxy.slowdown_share = 0.3  # the manifest's requests too
    store = open_remote(f"s3://{bucket}/cache", local_cache=tmp_path / "node", cache_limit="8MB")
    assert_same(loader_batches(store, [0]), loader_batches(ShardStore.open(root), [0]))
    stats = s3_proxy.stats()
    epoch = set(RandomShardSubsetCachedDataset(store, shards_per_epoch=6, random_subset_seed=3,
                                               batch_size=16).set_epoch(0))
    attempts = RetryPolicy().attempts
    for key, data in files.items():
        st = stats.get(f"{bucket}/cache/{key}")
        if int(key[6:12]) not in epoch:  # the next epoch's first shards may be on their way: once at most
            assert st is None or (st.count("GET", 206) <= 1 and st.body_bytes <= len(data)), (key, st)
            continue
        assert st is not None and st.body_bytes == len(data), key  # one whole copy: a 503 carries no shard bytes
        assert st.count("HEAD", 200) == 1 and st.count("GET", 206) == 1, (key, st.requests)
        assert st.count(status=503) <= 2 * (attempts - 1), (key, st.requests)  # HEAD and GET, each retried
    failed = sum(st.count(status=503) for st in stats.values())
    total = sum(st.count() for st in stats.values())
    print(f"{total} requests, {failed} answered 503 ({failed / total:.0%})")
    assert failed > 0
    assert total <= 2 * (total - failed)  # a 30% failure rate costs ~1.4 attempts a request, not unbounded


def test_a_body_cut_short_once_is_fetched_again(
        tmp_path: Path, s3_server, s3_proxy, bucket, aws_env, open_remote) -> None:
    root = write_cache(tmp_path / "cache", num_shards=12, rows=256)
    files = source_files(root)
    s3_server.upload_tree(root, bucket, "cache")
    store = open_remote(f"s3://{bucket}/cache", local_cache=tmp_path / "node", cache_limit="8MB")
    first = RandomShardSubsetCachedDataset(store, shards_per_epoch=6, random_subset_seed=3,
                                           batch_size=16).set_epoch(0)[0]
    key = f"shard_{first:06d}/images.npy"
    s3_proxy.truncate_next(1, lambda method, k, headers: method == "GET" and k == f"{bucket}/cache/{key}")
    assert_same(loader_batches(store, [0]), loader_batches(ShardStore.open(root), [0]))
    st = s3_proxy.stats()[f"{bucket}/cache/{key}"]
    assert st.count("GET") == 2 and st.body_bytes == len(files[key]) + len(files[key]) // 2
    assert (tmp_path / "node" / key).read_bytes() == files[key]


PART = 256 << 10  # the local cache's part size in these tests: a 600 KB object takes three ranged GETs


def write_big_shard(root: Path, rows: int = 150, row_bytes: int = 4096, *, checksum: bool = False) -> Path:
    """One shard whose images file (600 KB) is fetched in three ranged GETs of ``PART`` bytes."""
    from shardstore import ShardWriter

    rng = np.random.default_rng(7)
    with ShardWriter(root, rows, fsync=False) as w:
        w.add_batch({"images": rng.integers(0, 255, (rows, row_bytes), dtype=np.uint8),
                     "labels": np.arange(rows, dtype=np.int64)})
    build_manifest(root, checksum=checksum)
    return root


class ReplaceObject:
    """A proxy hook that overwrites ``key`` through the server (not the proxy) before some ranged GETs of it.

    ``every=False``: once, at the second ranged GET (the download has begun; whether the first part left the
    server before the new version landed depends on the threads' timing). ``every=True``: before every ranged
    GET, each time with other bytes, so no download can finish.
    """

    def __init__(self, s3_server, bucket: str, key: str, new: bytes, *, every: bool = False) -> None:
        self.s3, self.bucket, self.key, self.new, self.every = s3_server, bucket, key, new, every
        self.gets = 0
        self.replaced = 0

    def __call__(self, method: str, key: str, headers) -> None:
        if method != "GET" or key != f"{self.bucket}/{self.key}" or not headers.get("Range"):
            return
        self.gets += 1
        if self.every or (self.gets == 2 and not self.replaced):
            self.replaced += 1
            body = self.new if not self.every else self.new[:-8] + self.replaced.to_bytes(8, "little")
            self.s3.boto3_client().put_object(Bucket=self.bucket, Key=self.key, Body=body)


def test_an_object_replaced_between_two_ranged_gets_is_fetched_again_whole(
        tmp_path: Path, s3_server, s3_proxy, bucket, aws_env, open_remote) -> None:
    root = write_big_shard(tmp_path / "big")
    key = "shard_000000/images.npy"
    old = (root / key).read_bytes()
    assert len(old) > 2 * PART
    new = old[:128] + bytes(255 - b for b in old[128:])  # same header and size, every value changed
    s3_server.upload_tree(root, bucket, "big")
    hook = ReplaceObject(s3_server, bucket, f"big/{key}", new)
    s3_proxy.on_request = hook
    store = open_remote(f"s3://{bucket}/big", local_cache=tmp_path / "node", cache_limit="64MB",
                        prefetch_shards=1)
    store.remote.cache.part_size = PART
    images = store.field(0, "images")
    # The manifest records no checksum, so the new version is what the store now holds: it is taken whole,
    # never a file with the old first part and the new second part.
    assert hook.replaced == 1
    assert (tmp_path / "node" / key).read_bytes() == new
    np.testing.assert_array_equal(images, np.load(io.BytesIO(new)))
    st = s3_proxy.stats()[f"{bucket}/big/{key}"]
    # One HEAD per version; the parts that met the new version were refused (412), and the new one came whole.
    assert st.count("HEAD") == 2 and st.count("GET", 412) >= 1 and st.count("GET", 206) >= 3


def test_an_object_replaced_mid_download_against_a_manifest_with_checksums_is_refused_in_one_line(
        tmp_path: Path, s3_server, s3_proxy, bucket, aws_env, open_remote) -> None:
    from shardstore.errors import CorruptShardError

    root = write_big_shard(tmp_path / "big", checksum=True)
    key = "shard_000000/images.npy"
    old = (root / key).read_bytes()
    s3_server.upload_tree(root, bucket, "big")
    s3_proxy.on_request = ReplaceObject(s3_server, bucket, f"big/{key}", old[:128] + old[:127:-1])
    store = open_remote(f"s3://{bucket}/big", local_cache=tmp_path / "node", cache_limit="64MB",
                        prefetch_shards=1)
    store.remote.cache.part_size = PART
    # The whole new version arrives, and its SHA-256 is not the one the manifest records.
    with pytest.raises(CorruptShardError, match=rf"s3://{bucket}/big/{key}: SHA-256 of the downloaded bytes .* "
                                                "the manifest says .* rebuild the manifest") as info:
        store.field(0, "images")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "node" / key).exists()


def test_an_object_replaced_in_every_download_is_refused_in_one_line_naming_it(
        tmp_path: Path, s3_server, s3_proxy, bucket, aws_env, open_remote) -> None:
    from shardstore.loader.shard_loader import ShardLoader

    root = write_big_shard(tmp_path / "big")
    key = "shard_000000/images.npy"
    old = (root / key).read_bytes()
    s3_server.upload_tree(root, bucket, "big")
    s3_proxy.on_request = hook = ReplaceObject(s3_server, bucket, f"big/{key}", old, every=True)
    store = open_remote(f"s3://{bucket}/big", local_cache=tmp_path / "node", cache_limit="64MB",
                        prefetch_shards=1)
    store.remote.cache.part_size = PART
    with (pytest.raises(RemoteError, match=rf"s3://{bucket}/big/{key} was replaced twice while it was being "
                                           "downloaded") as info,
          ShardLoader(store, batch_size=64, num_threads=1) as loader):
        for _ in loader:
            pass
    assert hook.replaced >= 2
    assert "\n" not in str(info.value)
    store.remote.close()  # its prefetcher may be trying again
    assert not (tmp_path / "node" / key).exists()
    assert os.listdir(tmp_path / "node" / BOOKKEEPING / "tmp") == []


# -- 4. DataLoader workers of each start method --------------------------------------------------------


@pytest.mark.parametrize("context", ["fork", "forkserver", "spawn"])
def test_dataloader_workers_of_every_start_method_read_a_remote_store(
        tmp_path: Path, s3_server, s3_proxy, bucket, aws_env, open_remote, context: str) -> None:
    root = write_cache(tmp_path / "cache", num_shards=12, rows=256)
    files = source_files(root)
    s3_server.upload_tree(root, bucket, "cache")
    store = open_remote(f"s3://{bucket}/cache", local_cache=tmp_path / "node", cache_limit="8MB",
                            prefetch_shards=2)
    config = rank_config(rank=0, world_size=1, shards_per_epoch=4, batch_size=16, epochs=[0, 1])
    got = epoch_digests(make_dataset(store, config), config["epochs"], num_workers=2, context=context,
                        persistent=True)  # set_epoch reaches the workers through shared memory
    assert got == local_digests(root, config)
    stats = s3_proxy.stats()
    over = {k: st.body_bytes for k in files
            if (st := stats.get(f"{bucket}/cache/{k}")) and st.body_bytes != len(files[k])}
    assert over == {}  # workers never download: each file came once, through the rank's prefetcher


# -- 5. a manifest of a million shards --------------------------------------------------------------------


def test_a_million_shard_manifest_costs_one_request_a_column_once_per_node(
        tmp_path: Path, s3_server, s3_proxy, bucket, aws_env, open_remote) -> None:
    from shardstore.store.manifest import FieldSpec, Manifest, empty_columns
    from shardstore.store.snapshot import write_manifest

    num_shards, rows = 1_000_000, 4
    fields = {"images": FieldSpec(np.dtype(np.uint8), (16,))}
    root = tmp_path / "cache"
    root.mkdir()
    cols = empty_columns(fields, num_shards)
    cols["id"][:] = np.arange(num_shards)
    cols["samples"][:] = rows
    cols["images.offset"][:] = 128  # where np.save puts the data of a (4, 16) uint8 array
    write_manifest(root, Manifest(fields, columns=cols))
    # Only the shards epochs 0 and 1 read exist (the loader prepares epoch 1 while epoch 0 drains).
    config = rank_config(rank=0, world_size=1, shards_per_epoch=2, batch_size=4, epochs=[0])
    ds = make_dataset(ShardStore.open(root), config)
    real = sorted({s for e in (0, 1) for s in ds.set_epoch(e)})
    for shard_id in real:
        path = root / f"shard_{shard_id:06d}" / "images.npy"
        path.parent.mkdir()
        np.save(path, np.full((rows, 16), shard_id % 251, np.uint8))
        cols["images.mtime_ns"][shard_id] = path.stat().st_mtime_ns
    write_manifest(root, Manifest(fields, columns=cols))
    header = json.loads((root / "manifest.json").read_text())
    client = s3_server.boto3_client()
    keys = ["manifest.json", *(f"{header['table']}/{c}.npy" for c in header["columns"]),
            *(f"shard_{s:06d}/images.npy" for s in real)]
    for key in keys:
        client.put_object(Bucket=bucket, Key=f"big/{key}", Body=(root / key).read_bytes())
    url = f"s3://{bucket}/big"

    s3_proxy.reset()
    store = open_remote(url, local_cache=tmp_path / "node", cache_limit="256MB", prefetch_shards=2)
    assert store.num_shards == num_shards
    print(f"{num_shards:,} shards: open made {s3_proxy.total_requests} requests ({len(header['columns'])} columns)")
    assert s3_proxy.total_requests <= 1 + len(header["columns"])
    s3_proxy.reset()
    again = open_remote(url, local_cache=tmp_path / "node", cache_limit="256MB", prefetch_shards=2)
    assert again.num_shards == num_shards and s3_proxy.total_requests == 0  # within the TTL: no request

    # The rank brings epochs 0 and 1; then a spawned worker reads epoch 0 from the pickled store with no request.
    ds = make_dataset(store, config)
    ds.set_epoch(0)  # the prefetcher takes epoch 0 and the start of epoch 1
    for epoch in (0, 1):
        for position in ds.rank_plan(epoch).visited:
            store.fetch(int(position))  # here, or waiting for the prefetcher
    s3_proxy.reset()
    got = epoch_digests(ds, [0], num_workers=1, context="spawn")
    assert s3_proxy.total_requests == 0, {k: st.requests for k, st in s3_proxy.stats().items()}
    assert got == local_digests(root, config)


# -- 6. a fault the retries cannot absorb reaches the consumer ---------------------------------------------


def test_a_shard_whose_every_get_fails_is_one_line_at_the_batch_that_needs_it(
        tmp_path: Path, s3_server, s3_proxy, bucket, aws_env, open_remote, monkeypatch) -> None:
    from shardstore.loader.shard_loader import ShardLoader
    from shardstore.remote import retry

    # The default number of attempts, without the backoff's seconds of sleep.
    policy = retry.RetryPolicy(attempts=retry.RetryPolicy().attempts, base_s=0.001, cap_s=0.002)
    monkeypatch.setattr(retry, "DEFAULT_POLICY", policy)
    root = write_cache(tmp_path / "cache", num_shards=12, rows=256)
    s3_server.upload_tree(root, bucket, "cache")
    local = ShardStore.open(root)
    store = open_remote(f"s3://{bucket}/cache", local_cache=tmp_path / "node", cache_limit="8MB",
                            prefetch_shards=2)
    ds = RandomShardSubsetCachedDataset(store, shards_per_epoch=6, random_subset_seed=3, batch_size=16)
    broken = ds.set_epoch(0)[3]  # the fourth shard the epoch visits
    key = f"shard_{broken:06d}/labels.npy"
    s3_proxy.fail_next(503, 10_000, lambda method, k, headers: method == "GET" and k == f"{bucket}/cache/{key}")
    ids = ds.indices()
    shard_of_sample = local.locate(ids)[0]
    first_bad = int(np.flatnonzero(np.asarray(local.shard_ids)[shard_of_sample] == broken)[0]) // 16
    want = loader_batches(local, [0])[:first_bad]
    got = []
    with pytest.raises(RemoteError) as info, ShardLoader(ds, batch_size=16, num_threads=2) as loader:
        loader.set_epoch(0)
        for batch in loader:
            got.append({k: v.numpy().copy() for k, v in batch.items()})
    message = str(info.value)
    print(message)
    assert_same(got, want)  # every batch before the one that needs the shard
    assert "\n" not in message
    assert f"s3://{bucket}/cache/{key}" in message
    assert f"failed after {policy.attempts} attempts" in message
    assert "last cause" in message and "SlowDown" in message


def test_a_shard_the_prefetcher_cannot_fetch_fails_the_dataloader_worker_waiting_for_it(
        tmp_path: Path, s3_server, s3_proxy, bucket, aws_env, open_remote, monkeypatch) -> None:
    from torch.utils.data import DataLoader

    import shardstore.store.remote as remote_module
    from shardstore.remote import retry

    policy = retry.RetryPolicy(attempts=retry.RetryPolicy().attempts, base_s=0.001, cap_s=0.002)
    monkeypatch.setattr(retry, "DEFAULT_POLICY", policy)
    monkeypatch.setattr(remote_module, "WORKER_WAIT_S", 60.0)  # a worker told nothing fails here, not in 10 min
    root = write_cache(tmp_path / "cache", num_shards=12, rows=256)
    s3_server.upload_tree(root, bucket, "cache")
    store = open_remote(f"s3://{bucket}/cache", local_cache=tmp_path / "node", cache_limit="8MB", prefetch_shards=2)
    config = rank_config(rank=0, world_size=1, shards_per_epoch=6, batch_size=16, epochs=[0])
    ds = make_dataset(store, config)
    broken = ds.set_epoch(0)[3]
    key = f"shard_{broken:06d}/labels.npy"
    s3_proxy.fail_next(503, 10_000, lambda method, k, headers: method == "GET" and k == f"{bucket}/cache/{key}")
    local = make_dataset(ShardStore.open(root), config)
    local.set_epoch(0)
    ids = local.indices()
    first_bad = int(np.flatnonzero(np.asarray(local.store.shard_ids)[local.store.locate(ids)[0]] == broken)[0]) // 16
    want = list(DataLoader(local, batch_size=16))[:first_bad]
    got: list[dict[str, Any]] = []
    with pytest.raises(Exception) as info:  # torch raises the worker's error again, as the same type
        got.extend(DataLoader(ds, batch_size=16, num_workers=1, multiprocessing_context="fork"))  # up to the error
    assert len(got) == first_bad and all(batch_digest(a) == batch_digest(b) for a, b in zip(got, want))
    message = str(info.value)
    assert f"could not fetch shard shard_{broken:06d}" in message
    assert f"GET s3://{bucket}/cache/{key}" in message and f"failed after {policy.attempts} attempts" in message
    assert "SlowDown" in message


def test_a_worker_whose_rank_has_exited_stops_waiting(tmp_path: Path, s3_server, bucket, aws_env) -> None:
    import pickle

    root = write_cache(tmp_path / "cache", num_shards=4, rows=64)
    s3_server.upload_tree(root, bucket, "cache")
    node, pickled = tmp_path / "node", tmp_path / "store.pickle"
    # A rank opens the store, hands it to a worker (pickled) and exits before fetching anything.
    code = ("import pickle, sys; from shardstore.store.reader import ShardStore; "
            "s = ShardStore.open(sys.argv[1], local_cache=sys.argv[2], cache_limit='8MB', prefetch_shards=1); "
            "open(sys.argv[3], 'wb').write(pickle.dumps(s))")
    subprocess.run([sys.executable, "-c", code, f"s3://{bucket}/cache", str(node), str(pickled)], cwd=ROOT,
                   check=True, timeout=60)
    store = pickle.loads(pickled.read_bytes())
    assert not store.remote.is_owner
    with pytest.raises(RemoteError, match=r"shard shard_000000 will not arrive: the rank process \d+ that fetches "
                                          "this DataLoader worker's shards has exited"):
        store.field(0, "images")
