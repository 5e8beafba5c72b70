"""The node-local shard cache against a directory-backed fake store: fetching, checking, eviction, cleaning."""

from __future__ import annotations

import hashlib
import os
import pickle
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from shardstore.errors import ConfigError, CorruptShardError, ManifestError, ShardstoreError
from shardstore.remote.local_cache import (
    BOOKKEEPING,
    LocalCache,
    RemoteFile,
    ShardFiles,
    disk_usage,
)
from shardstore.remote.objects import ObjectChanged, ObjectInfo, ObjectNotFound, RemoteError, TransientRemoteError
from shardstore.remote.retry import RetryPolicy

FAST = RetryPolicy(attempts=4, base_s=0.0, cap_s=0.0)


class FakeStore:
    """Objects are files under ``root``; the ETag is the file's inode and mtime, so a replacement changes it.

    Every request is appended to ``root/.log`` as ``pid op key start end`` (one ``O_APPEND`` write, so several
    processes can log at once). ``faults`` are called before each ranged GET with ``(key, start, end)`` and may
    raise, replace the object, or return a number of bytes to cut the body to (a client that breaks its promise).
    ``delay_s`` slows each GET, to give tests a window inside a download.
    """

    url = "fake://bucket"

    def __init__(self, root: Path, delay_s: float = 0.0) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.delay_s = delay_s
        self.faults: list[Callable[[str, int, int], int | None]] = []

    def __getstate__(self) -> dict[str, object]:
        return {**self.__dict__, "faults": []}  # a copy in another process injects no faults

    def _file(self, key: str) -> Path:
        return self.root / "objects" / key

    def _etag(self, st: os.stat_result) -> str:
        return f'"{st.st_ino:x}-{st.st_mtime_ns:x}"'

    def _log(self, *fields: object) -> None:
        fd = os.open(self.root / ".log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (" ".join(map(str, (os.getpid(), *fields, time.monotonic()))) + "\n").encode())
        finally:
            os.close(fd)

    def log(self) -> list[tuple[int, str, str, int, int, float]]:
        """The requests so far: (pid, op, key, start, end, monotonic time)."""
        path = self.root / ".log"
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            pid, op, key, start, end, t = line.split()
            out.append((int(pid), op, key, int(start), int(end), float(t)))
        return out

    def head(self, key: str) -> ObjectInfo:
        self._log("HEAD", key, 0, 0)
        try:
            st = self._file(key).stat()
        except FileNotFoundError:
            raise ObjectNotFound(f"{self.url}/{key}: no such object") from None
        return ObjectInfo(key, st.st_size, self._etag(st))

    def get_range(self, key: str, start: int, end: int, *, if_match: str | None = None) -> bytes:
        self._log("GET", key, start, end)
        cut = None
        for fault in self.faults:
            cut = fault(key, start, end) or cut
        if self.delay_s:
            time.sleep(self.delay_s)
        try:
            with open(self._file(key), "rb") as f:
                if if_match is not None and self._etag(os.fstat(f.fileno())) != if_match:
                    raise ObjectChanged(f"{self.url}/{key}: ETag no longer {if_match}")
                f.seek(start)
                data = f.read(end - start)
        except FileNotFoundError:
            raise ObjectNotFound(f"{self.url}/{key}: no such object") from None
        return data[:cut] if cut is not None else data

    def get(self, key: str) -> bytes:
        return self.get_range(key, 0, self._file(key).stat().st_size)

    def put(self, key: str, data: bytes) -> None:
        path = self._file(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.rename(tmp, path)

    def delete(self, key: str) -> None:
        self._file(key).unlink(missing_ok=True)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        for path in sorted((self.root / "objects").rglob("*")):
            key = path.relative_to(self.root / "objects").as_posix()
            if path.is_file() and key.startswith(prefix):
                yield ObjectInfo(key, path.stat().st_size, self._etag(path.stat()))

    def gets(self, key: str | None = None) -> list[tuple[int, int]]:
        return [(s, e) for _, op, k, s, e, _ in self.log() if op == "GET" and (key is None or k == key)]


def payload(key: str, size: int) -> bytes:
    """Bytes that differ for every key and every offset, so a misplaced part is caught."""
    seed = hashlib.sha256(key.encode()).digest()
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(seed + counter.to_bytes(8, "little")).digest()
        counter += 1
    return bytes(out[:size])


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def make_shard(store: FakeStore, index: int, sizes: tuple[int, ...] = (50_000, 1_234), *,
               checksum: bool = True, flat: bool = False) -> ShardFiles:
    """Shard ``index``: one object per size, put into ``store``, listed with their checksums."""
    name = f"shard_{index:06d}"
    files = []
    for field, size in zip(("images", "labels", "feats"), sizes):
        key = f"{field}_{index:06d}.npy" if flat else f"{name}/{field}.npy"
        data = payload(key, size)
        store.put(key, data)
        files.append(RemoteFile(key, size, sha(data) if checksum else None))
    return ShardFiles(name, tuple(files))


def file_ok(root: Path, f: RemoteFile) -> bool:
    path = root / f.key
    return path.stat().st_size == f.size and (f.sha256 is None or sha(path.read_bytes()) == f.sha256)


def leftovers(root: Path) -> list[str]:
    """Temporaries in the cache: downloads, placeholders, receipts being written."""
    receipts = [name for name in os.listdir(root / BOOKKEEPING / "fetched") if name.startswith(".")]
    return sorted(os.listdir(root / BOOKKEEPING / "tmp")) + receipts


@pytest.fixture
def store(tmp_path: Path) -> FakeStore:
    return FakeStore(tmp_path / "store")


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def open_cache(cache_dir: Path, store: FakeStore, limit: int = 1 << 30, **kwargs) -> LocalCache:
    kwargs.setdefault("part_size", 16_384)
    kwargs.setdefault("policy", FAST)
    return LocalCache(cache_dir, limit, store, **kwargs)


# -- fetching -----------------------------------------------------------------------------------------


def test_fetch_once_then_fast_path(store: FakeStore, cache_dir: Path) -> None:
    shard = make_shard(store, 1)
    cache = open_cache(cache_dir, store)
    cache.ensure(shard)
    first = len(store.log())
    assert first == 2 + 4 + 1  # two HEADs, 50,000 bytes in 16 KiB parts, 1,234 bytes in one
    assert cache.ensure(shard) == 0.0
    assert len(store.log()) == first
    s = cache.stats
    assert (s.shards_downloaded, s.files_downloaded, s.bytes_downloaded, s.requests) == (1, 2, 51_234, 7)
    assert (cache_dir / BOOKKEEPING / "fetched" / shard.name).exists()
    assert leftovers(cache_dir) == []


def test_final_files_are_complete_and_identical(store: FakeStore, cache_dir: Path) -> None:
    shard = make_shard(store, 3, (3 * 16_384 + 1, 0, 16_384))
    cache = open_cache(cache_dir, store, parallel_parts=3)
    cache.ensure(shard)
    for f in shard.files:
        assert (cache_dir / f.key).read_bytes() == payload(f.key, f.size)
    parts = sorted(store.gets(shard.files[0].key))
    assert parts == [(0, 16_384), (16_384, 32_768), (32_768, 49_152), (49_152, 49_153)]


def test_flat_keys_and_no_checksums(store: FakeStore, cache_dir: Path) -> None:
    shards = [make_shard(store, i, checksum=False, flat=True) for i in range(3)]
    cache = open_cache(cache_dir, store)
    for shard in shards:
        cache.ensure(shard)
    assert sorted(p.name for p in cache_dir.iterdir() if p.name != BOOKKEEPING) == sorted(
        f.key for s in shards for f in s.files)


def test_checksum_mismatch_is_refused_and_leaves_nothing(store: FakeStore, cache_dir: Path) -> None:
    shard = make_shard(store, 1)
    bad = shard.files[0]
    wrong = ShardFiles(shard.name, (RemoteFile(bad.key, bad.size, sha(b"something else")), shard.files[1]))
    cache = open_cache(cache_dir, store)
    with pytest.raises(CorruptShardError, match=r"images.npy: SHA-256 of the downloaded bytes is sha256:.*"
                                                r"rebuild the manifest"):
        cache.ensure(wrong)
    assert not (cache_dir / bad.key).exists()
    assert not (cache_dir / BOOKKEEPING / "fetched" / shard.name).exists()
    assert leftovers(cache_dir) == []


def test_size_mismatch_is_refused_before_any_get(store: FakeStore, cache_dir: Path) -> None:
    shard = make_shard(store, 1)
    f = shard.files[0]
    cache = open_cache(cache_dir, store)
    with pytest.raises(CorruptShardError, match=r"images.npy is 50,000 bytes in the store but the manifest says "
                                                r"50,001 .* rebuild the manifest"):
        cache.ensure(ShardFiles(shard.name, (RemoteFile(f.key, f.size + 1, None),)))
    assert store.gets() == []
    assert leftovers(cache_dir) == []


def test_missing_object_names_the_fix(store: FakeStore, cache_dir: Path) -> None:
    cache = open_cache(cache_dir, store)
    with pytest.raises(ObjectNotFound, match=r"fake://bucket/nope.npy \(shard shard_000009\) is not in the store; "
                                             r"rebuild the manifest"):
        cache.ensure(ShardFiles("shard_000009", (RemoteFile("nope.npy", 5),)))


@pytest.mark.parametrize("how", ["raise", "short"])
def test_truncated_part_is_retried(store: FakeStore, cache_dir: Path, how: str) -> None:
    shard = make_shard(store, 1)
    failed: list[tuple[int, int]] = []

    def truncate_once(key: str, start: int, end: int) -> int | None:
        if start == 16_384 and key == shard.files[0].key and not failed:
            failed.append((start, end))
            if how == "raise":
                raise TransientRemoteError(f"{key}: body ended after 100 bytes (truncated)")
            return 100  # a client that hands back a short body instead of raising
        return None

    store.faults.append(truncate_once)
    cache = open_cache(cache_dir, store)
    cache.ensure(shard)
    assert failed and file_ok(cache_dir, shard.files[0])
    assert store.gets(shard.files[0].key).count((16_384, 32_768)) == 2
    assert cache.stats.retries == 1


def test_persistent_failure_is_one_remote_error_and_leaves_nothing(store: FakeStore, cache_dir: Path) -> None:
    shard = make_shard(store, 1)

    def always(key: str, start: int, end: int) -> None:
        if start == 32_768:
            raise TransientRemoteError("503 SlowDown")

    store.faults.append(always)
    cache = open_cache(cache_dir, store)
    with pytest.raises(RemoteError, match=r"GET fake://bucket/shard_000001/images.npy \[32768, 49152\): failed "
                                          r"after 4 attempts; last cause: TransientRemoteError: 503 SlowDown"):
        cache.ensure(shard)
    assert not (cache_dir / shard.files[0].key).exists()
    assert leftovers(cache_dir) == []


def test_object_replaced_mid_download_is_fetched_again(store: FakeStore, cache_dir: Path) -> None:
    shard = make_shard(store, 1, checksum=False)
    key = shard.files[0].key
    new = bytes(reversed(payload(key, shard.files[0].size)))
    replaced: list[int] = []

    def replace_once(k: str, start: int, end: int) -> None:
        if k == key and start == 16_384 and not replaced:
            replaced.append(start)
            time.sleep(0.002)  # a different mtime: a different ETag even on a coarse clock
            store.put(key, new)

    store.faults.append(replace_once)
    cache = open_cache(cache_dir, store, parallel_parts=1)
    cache.ensure(shard)
    assert (cache_dir / key).read_bytes() == new  # all parts from the new object, none from the old
    assert [op for _, op, k, *_ in store.log() if k == key].count("HEAD") == 2


def test_object_replaced_twice_is_refused(store: FakeStore, cache_dir: Path) -> None:
    shard = make_shard(store, 1, checksum=False)
    key = shard.files[0].key
    count = [0]

    def replace(k: str, start: int, end: int) -> None:
        if k == key and start == 16_384:
            count[0] += 1
            time.sleep(0.002)
            store.put(key, payload(f"{key}{count[0]}", shard.files[0].size))

    store.faults.append(replace)
    cache = open_cache(cache_dir, store, parallel_parts=1)
    with pytest.raises(RemoteError, match=r"shard_000001/images.npy was replaced twice while it was being "
                                          r"downloaded; stop whatever rewrites"):
        cache.ensure(shard)
    assert not (cache_dir / key).exists() and leftovers(cache_dir) == []


@pytest.mark.parametrize("limit", [None, 1])
def test_requests_go_through_the_node_gate(store: FakeStore, cache_dir: Path, tmp_path: Path,
                                           limit: int | None) -> None:
    from shardstore.remote.gate import NodeGate

    shard = make_shard(store, 1, (8 * 16_384,))
    lock, active, peak = threading.Lock(), [0], [0]

    def count(key: str, start: int, end: int) -> None:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.02)
        with lock:
            active[0] -= 1

    store.faults.append(count)
    gate = None if limit is None else NodeGate(tmp_path / "gate", limit)
    cache = open_cache(cache_dir, store, parallel_parts=4, gate=gate)
    cache.ensure(shard)
    assert peak[0] == (4 if limit is None else 1)
    assert pickle.loads(pickle.dumps(cache)).gate.__class__ is gate.__class__


@pytest.mark.parametrize("key", ["../evil.npy", "/etc/passwd", "a/../../b", "a//b", "./a", "a/", "",
                                 ".shardstore/locks/x.lock", "a\0b"])
def test_hostile_keys_are_refused(key: str) -> None:
    with pytest.raises(ManifestError, match=r"would be stored outside the local cache .* rebuild the manifest"):
        RemoteFile(key, 1)


def test_key_through_a_symlink_out_of_the_cache_is_refused(store: FakeStore, cache_dir: Path,
                                                            tmp_path: Path) -> None:
    shard = make_shard(store, 1)
    cache = open_cache(cache_dir, store)
    (tmp_path / "elsewhere").mkdir()
    (cache_dir / "shard_000001").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ManifestError, match=r"resolves outside the local cache .* \(a symlink on the way\?\)"):
        cache.ensure(shard)
    assert list((tmp_path / "elsewhere").iterdir()) == []


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "", "x" * 65])
def test_bad_shard_names_are_refused(name: str, store: FakeStore, cache_dir: Path) -> None:
    with pytest.raises(ManifestError, match=r"cannot name a lock file .* name shards like shard_000042"):
        ShardFiles(name, ())
    with pytest.raises(ManifestError, match=r"cannot name a lock file"):
        open_cache(cache_dir, store).pin(name)


def test_bad_settings_are_refused(store: FakeStore, cache_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"cache_limit must be a whole number >= 1, got 0"):
        LocalCache(cache_dir, 0, store)
    with pytest.raises(ConfigError, match=r"parallel_parts must be a whole number >= 1"):
        LocalCache(cache_dir, 10, store, parallel_parts=0)


def test_wrong_sized_local_file_is_left_alone(store: FakeStore, cache_dir: Path) -> None:
    shard = make_shard(store, 1)
    (cache_dir / "shard_000001").mkdir(parents=True)
    (cache_dir / shard.files[0].key).write_bytes(b"mine")
    cache = open_cache(cache_dir, store)
    with pytest.raises(CorruptShardError, match=r"images.npy is 4 bytes but the manifest says 50,000; the cache did "
                                                r"not download it, so it is left alone"):
        cache.ensure(shard)
    assert (cache_dir / shard.files[0].key).read_bytes() == b"mine"


def test_a_file_of_the_cache_with_the_wrong_size_is_fetched_again(store: FakeStore, cache_dir: Path) -> None:
    shard = make_shard(store, 1)
    cache = open_cache(cache_dir, store)
    cache.ensure(shard)
    with open(cache_dir / shard.files[1].key, "r+b") as f:
        f.truncate(10)
    cache.ensure(shard)
    assert all(file_ok(cache_dir, f) for f in shard.files)
    assert cache.stats.files_downloaded == 3


def test_half_evicted_shard_is_fetched_again_and_stays_evictable(store: FakeStore, cache_dir: Path) -> None:
    shard = make_shard(store, 1)
    cache = open_cache(cache_dir, store)
    cache.ensure(shard)
    (cache_dir / shard.files[0].key).unlink()  # an eviction killed after its first file: the receipt stays
    cache.ensure(shard)
    assert [len(store.gets(f.key)) for f in shard.files] == [8, 1]  # the missing file again, not the other
    assert cache._drop(shard.name) > 0
    assert not (cache_dir / "shard_000001").exists()
    assert os.listdir(cache_dir / BOOKKEEPING / "fetched") == []


def test_partly_present_shard_fetches_only_what_is_missing(store: FakeStore, cache_dir: Path) -> None:
    shard = make_shard(store, 1)
    local = shard.files[1]
    (cache_dir / "shard_000001").mkdir(parents=True)
    (cache_dir / local.key).write_bytes(payload(local.key, local.size))  # brought by hand
    cache = open_cache(cache_dir, store)
    cache.ensure(shard)
    assert store.gets(local.key) == []
    assert all(file_ok(cache_dir, f) for f in shard.files)


# -- space --------------------------------------------------------------------------------------------


def usage_now(cache_dir: Path) -> int:
    return disk_usage(cache_dir)


def empty_usage(cache_dir: Path, store: FakeStore) -> int:
    """What the cache directory holds once opened, before any shard."""
    open_cache(cache_dir, store)
    return usage_now(cache_dir)


def test_disk_usage_counts_like_du(tmp_path: Path) -> None:
    (tmp_path / "d" / "e").mkdir(parents=True)
    (tmp_path / "d" / "a").write_bytes(b"x" * 5000)
    (tmp_path / "d" / "e" / "b").write_bytes(b"")
    os.link(tmp_path / "d" / "a", tmp_path / "d" / "e" / "a2")
    expected = sum(os.lstat(p).st_blocks * 512 for p in [tmp_path / "d", tmp_path / "d" / "e",
                                                         tmp_path / "d" / "a", tmp_path / "d" / "e" / "b"])
    assert disk_usage(tmp_path / "d") == expected


def test_the_scan_skips_only_empty_lock_files(store: FakeStore, cache_dir: Path) -> None:
    cache = open_cache(cache_dir, store)
    for i in range(40):
        cache.ensure(make_shard(store, i, (5_000,)))
    locks = os.path.join(cache_dir, BOOKKEEPING, "locks")
    assert len(os.listdir(locks)) == 40
    assert disk_usage(cache_dir, empty=(locks,)) == disk_usage(cache_dir)


def shard_cost(store: FakeStore, cache_dir: Path) -> int:
    """Bytes one shard of ``make_shard``'s default sizes adds to a cache (files, receipt, directory)."""
    probe = cache_dir.parent / "probe"
    cache = open_cache(probe, store)
    cache.ensure(make_shard(store, 999))
    before = usage_now(probe)
    cache.ensure(make_shard(store, 998))
    return usage_now(probe) - before


def test_reservation_is_visible_during_the_download_and_covers_the_commit(store: FakeStore,
                                                                          cache_dir: Path) -> None:
    shard = make_shard(store, 1, (200_000, 30_000))
    cache = open_cache(cache_dir, store)
    reached, go = threading.Event(), threading.Event()

    def hold_first(key: str, start: int, end: int) -> None:
        if not reached.is_set():
            reached.set()
            assert go.wait(30)

    store.faults.append(hold_first)
    before = usage_now(cache_dir)
    fetch = threading.Thread(target=cache.ensure, args=(shard,))
    fetch.start()
    try:
        assert reached.wait(30)
        during = usage_now(cache_dir)  # what another process's scan would see now
        placeholders = [p for p in (cache_dir / BOOKKEEPING / "tmp").iterdir() if "~reserve" in p.name]
        assert [p.stat().st_size > 0 for p in placeholders] == [True]
    finally:
        go.set()
        fetch.join()
    after = usage_now(cache_dir)
    assert during >= before + 200_704 + 32_768  # both temporaries at full size, whole blocks
    assert before < after <= during  # the commit fits in what was reserved
    assert all(file_ok(cache_dir, f) for f in shard.files)


def test_limit_smaller_than_one_shard_is_a_clear_error(store: FakeStore, cache_dir: Path) -> None:
    shard = make_shard(store, 1)
    cache = open_cache(cache_dir, store, limit=40_000)
    with pytest.raises(RemoteError, match=r"cache_limit 40,000 bytes is too small: shard shard_000001 alone needs "
                                          r"[\d,]+ bytes; raise cache_limit"):
        cache.ensure(shard)
    assert store.gets() == []


def test_limit_held_by_pins_is_a_clear_error(store: FakeStore, cache_dir: Path) -> None:
    a, b = make_shard(store, 1), make_shard(store, 2)
    base = empty_usage(cache_dir, store) + 4 * 4096
    cache = open_cache(cache_dir, store, limit=base + 2 * shard_cost(store, cache_dir), space_timeout=0.2)
    cache.ensure(a, pin=True)
    with pytest.raises(RemoteError, match=r"cache_limit [\d,]+ bytes is too small: shard shard_000002 needs "
                                          r"[\d,]+ bytes while [\d,]+ are held by shards in use .* raise cache_limit"):
        cache.ensure(b)
    assert file_ok(cache_dir, a.files[0])


def fill(cache: LocalCache, shards: list[ShardFiles]) -> None:
    for shard in shards:
        cache.ensure(shard)


def present(cache_dir: Path, shard: ShardFiles) -> bool:
    return all((cache_dir / f.key).exists() for f in shard.files)


def tight_cache(store: FakeStore, cache_dir: Path, shards: int, **kwargs) -> LocalCache:
    """A cache with room for about ``shards`` shards (a download reserves a little more than it keeps)."""
    cost = shard_cost(store, cache_dir)
    base = empty_usage(cache_dir, store)
    return open_cache(cache_dir, store, limit=base + shards * cost + 40_000, **kwargs)


def test_usage_stays_under_the_limit_and_old_shards_go_first(store: FakeStore, cache_dir: Path) -> None:
    shards = [make_shard(store, i) for i in range(8)]
    cache = tight_cache(store, cache_dir, 3)
    for shard in shards:
        cache.ensure(shard)
        assert usage_now(cache_dir) <= cache.limit
        assert present(cache_dir, shard)
        time.sleep(0.01)  # distinct receipt times
    assert cache.stats.evictions >= 4
    kept = [s.name for s in shards if present(cache_dir, s)]
    assert kept == [s.name for s in shards[-len(kept):]]  # least recently used went first
    assert sorted(os.listdir(cache_dir / BOOKKEEPING / "fetched")) == kept
    assert not (cache_dir / "shard_000000").exists()  # emptied directories go too


def test_farthest_next_use_is_evicted_first(store: FakeStore, cache_dir: Path) -> None:
    shards = [make_shard(store, i) for i in range(5)]
    when = {"shard_000000": 5.0, "shard_000001": float("inf"), "shard_000002": 1.0, "shard_000003": 9.0}
    cache = tight_cache(store, cache_dir, 4, next_use=lambda name: when.get(name, 0.0))
    fill(cache, shards[:4])
    order = [shards[i].name for i in (1, 3, 0, 2)]  # never needed again first, then the one needed last
    evicted: list[str] = []
    for shard in (shards[4], make_shard(store, 5)):
        cache.ensure(shard)
        gone = [name for name in order if not (cache_dir / name).exists()]
        assert len(gone) > len(evicted) and gone == order[:len(gone)]
        evicted = gone


def test_pinned_and_protected_shards_survive(store: FakeStore, cache_dir: Path) -> None:
    shards = [make_shard(store, i) for i in range(6)]
    cache = tight_cache(store, cache_dir, 4, protected=lambda: {"shard_000001"})
    fill(cache, shards[:3])
    cache.pin("shard_000000")
    other = open_cache(cache_dir, store, limit=cache.limit)  # pins of another process-like user
    other.ensure(shards[2], pin=True)
    for shard in shards[3:]:
        cache.ensure(shard)
        assert usage_now(cache_dir) <= cache.limit
    assert all(present(cache_dir, s) for s in shards[:3])
    assert all(file_ok(cache_dir, f) for s in shards[:3] for f in s.files)
    cache.unpin("shard_000000")
    other.unpin("shard_000002")
    cache.ensure(make_shard(store, 7))
    assert not present(cache_dir, shards[0]) or not present(cache_dir, shards[2])


def test_pin_is_counted_and_unpin_checks(store: FakeStore, cache_dir: Path) -> None:
    cache = open_cache(cache_dir, store)
    shard = make_shard(store, 1)
    cache.ensure(shard, pin=True)
    cache.pin(shard.name)
    assert cache.pinned == {shard.name}
    cache.unpin(shard.name)
    assert cache.pinned == {shard.name}
    cache.unpin(shard.name)
    assert cache.pinned == frozenset()
    with pytest.raises(ValueError, match="not pinned"):
        cache.unpin(shard.name)


def test_a_pinned_shard_with_a_missing_file_is_an_error_not_a_deadlock(store: FakeStore, cache_dir: Path) -> None:
    cache = open_cache(cache_dir, store)
    shard = make_shard(store, 1)
    cache.ensure(shard, pin=True)
    (cache_dir / shard.files[0].key).unlink()
    with pytest.raises(RemoteError, match=r"shard shard_000001 is pinned by this process but a file of it is "
                                          r"missing .* unpin it"):
        cache.ensure(shard, timeout=5)


def test_local_only_shard_is_never_evicted(store: FakeStore, cache_dir: Path) -> None:
    mine = make_shard(store, 100)
    for f in mine.files:  # brought by hand: no receipt
        (cache_dir / f.key).parent.mkdir(parents=True, exist_ok=True)
        (cache_dir / f.key).write_bytes(payload(f.key, f.size))
    shards = [make_shard(store, i) for i in range(5)]
    cache = tight_cache(store, cache_dir, 2)
    cache.ensure(mine)
    assert [k for f in mine.files for k in store.gets(f.key)] == []
    before = usage_now(cache_dir)
    fill(cache, shards)
    assert present(cache_dir, mine) and cache.stats.evictions >= 3
    # Less room than one download needs even once every fetched shard is gone.
    small = open_cache(cache_dir, store, limit=before + 50_000, space_timeout=0.1)
    with pytest.raises(RemoteError, match="is too small"):  # everything evictable goes; the local shard stays
        small.ensure(make_shard(store, 50))
    assert present(cache_dir, mine) and all(file_ok(cache_dir, f) for f in mine.files)
    assert os.listdir(cache_dir / BOOKKEEPING / "fetched") == []


def test_ensure_and_pin_together_survive_an_eviction_in_between(store: FakeStore, cache_dir: Path) -> None:
    a = make_shard(store, 1)
    cache = open_cache(cache_dir, store)
    cache.ensure(a)
    original = cache._pin_if_present
    evicted = []

    def evict_first(shard: ShardFiles, paths: list[str]) -> bool:
        if not evicted:  # another process evicts the shard between the presence check and the pin
            evicted.append(cache._drop(shard.name))
        return original(shard, paths)

    cache._pin_if_present = evict_first  # type: ignore[method-assign]
    cache.ensure(a, pin=True)
    assert evicted and cache.pinned == {a.name} and all(file_ok(cache_dir, f) for f in a.files)


# -- waiting, cleaning, forks, pickles -----------------------------------------------------------------


def test_worker_that_may_not_download_waits_then_says_why(store: FakeStore, cache_dir: Path) -> None:
    shard = make_shard(store, 1)
    cache = open_cache(cache_dir, store)
    with pytest.raises(RemoteError, match=r"shard shard_000001 was never fetched by this rank's prefetcher .* "
                                          r"keep the prefetcher running ahead"):
        cache.ensure(shard, may_download=False, timeout=0.1)
    assert store.log() == []
    done = threading.Timer(0.1, lambda: open_cache(cache_dir, store).ensure(shard))
    done.start()
    waited = cache.ensure(shard, may_download=False, timeout=30)
    done.join()
    assert waited > 0 and all(file_ok(cache_dir, f) for f in shard.files)


def test_clean_removes_dead_temporaries_and_orphan_receipts(store: FakeStore, cache_dir: Path) -> None:
    a, b = make_shard(store, 1), make_shard(store, 2)
    cache = open_cache(cache_dir, store)
    fill(cache, [a, b])
    tmp = cache_dir / BOOKKEEPING / "tmp"
    (tmp / "shard_000001.images.npy.999999.abcd.part").write_bytes(b"x" * 10_000)
    (tmp / "shard_000003.~reserve.999999.abcd.part").write_bytes(b"x" * 10_000)  # shard with no lock file yet
    (cache_dir / BOOKKEEPING / "fetched" / ".shard_000001.999999.abcd").write_bytes(b"{}")
    for f in b.files:
        (cache_dir / f.key).unlink()
    assert cache.clean() == 4
    assert leftovers(cache_dir) == []
    assert sorted(os.listdir(cache_dir / BOOKKEEPING / "fetched")) == ["shard_000001"]


def test_clean_keeps_temporaries_of_a_live_download(store: FakeStore, cache_dir: Path) -> None:
    import fcntl

    cache = open_cache(cache_dir, store)
    shard = make_shard(store, 1)
    cache.ensure(shard)
    tmp = cache_dir / BOOKKEEPING / "tmp" / "shard_000001.images.npy.1.abcd.part"
    tmp.write_bytes(b"x")
    fd = os.open(cache_dir / BOOKKEEPING / "locks" / "shard_000001.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a download in progress
        assert cache.clean() == 0 and tmp.exists()
    finally:
        os.close(fd)
    assert cache.clean() == 1 and not tmp.exists()


def test_restarted_ensure_removes_dead_temporaries(store: FakeStore, cache_dir: Path) -> None:
    shard = make_shard(store, 1)
    cache = open_cache(cache_dir, store)
    tmp = cache_dir / BOOKKEEPING / "tmp"
    (tmp / "shard_000001.images.npy.999999.abcd.part").write_bytes(b"x" * 10_000)
    (tmp / "shard_000001.~reserve.999999.abcd.part").write_bytes(b"x" * 10_000)
    (cache_dir / BOOKKEEPING / "fetched" / ".shard_000001.999999.abcd").write_bytes(b"{}")
    assert len(leftovers(cache_dir)) == 3
    cache.ensure(shard)
    assert leftovers(cache_dir) == []


def test_a_waiting_download_ends_when_the_shard_lands_and_is_pinned(store: FakeStore, cache_dir: Path) -> None:
    import fcntl

    shard = make_shard(store, 1)
    cache = open_cache(cache_dir, store)
    lock = os.open(cache_dir / BOOKKEEPING / "locks" / "shard_000001.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(lock, fcntl.LOCK_EX)  # another process is downloading the shard
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            cache.ensure(shard, timeout=10)
        except BaseException as error:  # noqa: BLE001 - checked below
            errors.append(error)

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.1)  # the waiter polls the lock now
    for f in shard.files:  # the download lands ...
        (cache_dir / f.key).parent.mkdir(parents=True, exist_ok=True)
        (cache_dir / f.key).write_bytes(payload(f.key, f.size))
    fcntl.flock(lock, fcntl.LOCK_SH)  # ... and its exclusive lock becomes a reader's pin (no gap between them)
    try:
        waiter.join(30)
        assert not waiter.is_alive() and errors == []  # not held off by the pin until the timeout
        assert store.gets() == []
    finally:
        os.close(lock)


def test_pickled_cache_shares_the_directory(store: FakeStore, cache_dir: Path) -> None:
    shard = make_shard(store, 1)
    cache = open_cache(cache_dir, store, next_use=lambda name: 0.0)
    cache.ensure(shard, pin=True)
    copy = pickle.loads(pickle.dumps(cache))
    assert (copy.limit, copy.part_size, copy.next_use, copy.pinned) == (cache.limit, 16_384, None, frozenset())
    assert copy.ensure(shard, may_download=False, timeout=1) == 0.0


@pytest.mark.slow
def test_forked_child_drops_the_parents_pins(store: FakeStore, cache_dir: Path) -> None:
    import fcntl

    shard = make_shard(store, 1)
    cache = open_cache(cache_dir, store)
    cache.ensure(shard, pin=True)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: it must not keep the parent's pin alive, nor share its lock descriptors
        try:
            os.close(read)
            ok = cache.pinned == frozenset() and cache.ensure(shard) == 0.0
            os.write(write, b"1" if ok else b"0")
            time.sleep(0.5)
        finally:
            os._exit(0)
    os.close(write)
    assert os.read(read, 1) == b"1"
    cache.unpin(shard.name)
    fd = os.open(cache_dir / BOOKKEEPING / "locks" / "shard_000001.lock", os.O_RDWR)
    try:  # with the parent's pin gone nobody holds the lock, though the child is still alive
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
        os.waitpid(pid, 0)


def test_errors_are_shardstore_errors() -> None:
    assert issubclass(RemoteError, ShardstoreError) and issubclass(CorruptShardError, ShardstoreError)


def test_a_file_of_a_few_parts_is_split_to_keep_the_parallel_gets_busy(store: FakeStore, cache_dir: Path) -> None:
    cache = open_cache(cache_dir, store, part_size=8 << 20, parallel_parts=4)
    assert cache._part_of(6_300_000) == 1_575_000  # one 8 MiB part would leave three GETs idle
    assert cache._part_of(500_000) == 1 << 20      # never under 1 MiB a request
    assert cache._part_of(100 << 20) == 8 << 20    # big files: part_size
