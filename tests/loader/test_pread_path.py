"""``ShardLoader(pread=True)`` reads shards the store has not mapped with ``pread`` straight into the batch buffers:
the same batches as plain indexing, files closed when the loader lets go of a shard, a file that shrinks while
open named."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from shardstore import CorruptShardError, ShardStore, kernels, reference
from shardstore.dataset.subset import RandomShardSubsetCachedDataset
from shardstore.loader import ShardLoader, jobs
from shardstore.store.mmaps import field_rows, open_rows

from .conftest import write_gid_cache
from .test_plans import FIELDS, fields_at, want_ids


@pytest.fixture
def every_field_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every field of every job is read with pread, however short its reads (the test caches are tiny)."""
    monkeypatch.setattr(jobs, "PREAD_MIN_BYTES", 0)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _write_sources(root: Path, rng: np.random.Generator, counts: list[int], dtype: np.dtype,
                   shape: tuple[int, ...]) -> list[Path]:
    paths = []
    for j, n in enumerate(counts):
        path = root / f"x_{j:03d}.npy"
        np.save(path, rng.integers(0, 255, size=(n, *shape)).astype(dtype))
        paths.append(path)
    return paths


def _open_files(paths: list[Path]) -> tuple[list[np.ndarray], list[kernels.FileRows]]:
    arrays = [np.load(p, allow_pickle=False) for p in paths]
    files = []
    for p, a in zip(paths, arrays):
        offset = p.stat().st_size - a.nbytes  # np.save puts the rows after the header
        files.append(open_rows(p, a.dtype, a.shape, offset)[0])
    return arrays, files


@pytest.mark.parametrize("seed", range(12))
def test_the_pread_kernel_matches_the_reference(tmp_path: Path, seed: int) -> None:
    """Files read with pread, maps and in-memory sources mixed, copy exactly what NumPy indexing copies."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype([np.uint8, np.int16, np.int64, np.float32][seed % 4])
    shape = [(), (3,), (3, 8, 8), (1, 40_000)][seed // 4 % 4] if seed < 8 else (2, 5)
    counts = rng.integers(1, 14, size=rng.integers(1, 6)).tolist()
    arrays, files = _open_files(_write_sources(tmp_path, rng, counts, dtype, shape))
    mapped = [np.load(f.path, mmap_mode="r") for f in files]
    kinds = rng.integers(0, 3, size=len(counts))  # 0: file (pread), 1: memory map, 2: array in memory
    source_of = [files[j] if k == 0 else mapped[j] if k == 1 else arrays[j] for j, k in enumerate(kinds)]
    batch_size = int(rng.integers(1, 9))
    num_batches = int(rng.integers(1, 5))
    n = int(rng.integers((num_batches - 1) * batch_size + 1, num_batches * batch_size + 1))
    flat = [(j, r) for j, c in enumerate(counts) for r in range(c)]
    if seed % 2:  # sequential runs across shard boundaries
        start = int(rng.integers(0, len(flat)))
        picks = [flat[(start + k) % len(flat)] for k in range(n)]
    else:
        picks = [flat[int(i)] for i in rng.integers(0, len(flat), size=n)]
    source = np.array([p[0] for p in picks], np.int64)
    rows = np.array([p[1] for p in picks], np.int64)
    spec = {"x": (dtype, shape)}
    gather = kernels.BatchGather(np.array(counts), spec, lambda name, j: source_of[j],
                                 open_file=lambda name, j: source_of[j], file_fields=("x",), max_files=64)
    ring = 6
    buffers = kernels.BatchBuffers([{"x": np.full((batch_size, *shape), 7, dtype)} for _ in range(ring)], spec,
                                   batch_size)
    first = int(rng.integers(0, ring - num_batches + 1))
    gather.gather(source, rows, buffers, first)
    want = np.full((n, *shape), 7, dtype)
    reference.gather_rows(arrays, source, rows, want)
    got = np.concatenate([buffers.buffers[first + b]["x"] for b in range(num_batches)])[:n]
    np.testing.assert_array_equal(got, want)
    owned = {int(j) for j in source if kinds[j] == 0}
    assert gather.files_open == len(owned)
    before = open_fds()
    gather.release_all()  # the gather owns the descriptors of the files it opened, and closes them
    assert gather.files_open == 0 and open_fds() == before - len(owned)
    for j, rows_of in enumerate(files):
        if j not in owned:
            os.close(rows_of.fd)


def test_a_file_that_shrinks_while_open_is_a_short_read(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    paths = _write_sources(tmp_path, rng, [10, 10], np.dtype(np.float32), (4, 4))
    arrays, files = _open_files(paths)
    spec = {"x": (np.dtype(np.float32), (4, 4))}
    gather = kernels.BatchGather(np.array([10, 10]), spec, lambda name, j: files[j], open_file=lambda name, j: files[j],
                                 file_fields=("x",), max_files=8)
    buffers = kernels.BatchBuffers([{"x": np.zeros((5, 4, 4), np.float32)} for _ in range(4)], spec, 5)
    source, rows = np.repeat([0, 1], 10).astype(np.int64), np.tile(np.arange(10), 2).astype(np.int64)
    gather.gather(source[:5], rows[:5], buffers)  # opens file 0
    gather.gather(source[10:11], rows[10:11], buffers)  # and file 1
    os.truncate(paths[1], files[1].offset + 6 * 64)  # rows 0..5 of file 1 are left
    gather.gather(source[10:16], rows[10:16], buffers, 1)
    np.testing.assert_array_equal(np.concatenate([buffers.buffers[1]["x"], buffers.buffers[2]["x"][:1]]), arrays[1][:6])
    with pytest.raises(kernels.SourceShrank, match=r"field 'x' of source 1: its file ended at byte 512") as info:
        gather.gather(source[10:20], rows[10:20], buffers, 2)
    assert (info.value.field, info.value.source) == ("x", 1)
    # A descriptor that cannot be read is an OSError naming the file.
    bad = kernels.FileRows(os.open(tmp_path, os.O_RDONLY), 0, 640, 640, str(tmp_path))
    gather = kernels.BatchGather(np.array([10]), spec, lambda name, j: bad, open_file=lambda name, j: bad,
                                 file_fields=("x",), max_files=8)
    with pytest.raises(IsADirectoryError, match=str(tmp_path)):
        gather.gather(source[:2], rows[:2], buffers)
    gather.release_all()


def test_file_sources_are_checked_and_bounded(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    paths = _write_sources(tmp_path, rng, [3, 3, 3], np.dtype(np.int64), (2,))
    arrays, files = _open_files(paths)
    spec = {"x": (np.dtype(np.int64), (2,))}
    short = kernels.FileRows(os.dup(files[0].fd), files[0].offset, 32, files[0].file_bytes, files[0].path)
    gather = kernels.BatchGather(np.array([3]), spec, lambda name, j: arrays[0], open_file=lambda name, j: short,
                                 file_fields=("x",), max_files=8)
    buffers = kernels.BatchBuffers([{"x": np.zeros((3, 2), np.int64)}], spec, 3)
    before = open_fds()
    with pytest.raises(ValueError, match=r"source 0 of field 'x' is a file with 32 bytes of rows .* expected 48"):
        gather.gather(np.zeros(3, np.int64), np.arange(3, dtype=np.int64), buffers)
    assert open_fds() == before - 1  # the refused descriptor was closed
    # Past max_files, sources are opened the other way (maps in the loader: no descriptor held).
    opened = []
    gather = kernels.BatchGather(np.array([3, 3, 3]), spec, lambda name, j: opened.append(("map", j)) or arrays[j],
                                 open_file=lambda name, j: opened.append(("file", j)) or files[j],
                                 file_fields=("x",), max_files=2)
    gather.gather(np.repeat(np.arange(3), 3).astype(np.int64), np.tile(np.arange(3), 3).astype(np.int64),
                  kernels.BatchBuffers([{"x": np.zeros((9, 2), np.int64)}], spec, 9))
    assert opened == [("file", 0), ("file", 1), ("map", 2)] and gather.files_open == 2
    gather.release(0)
    assert gather.files_open == 1 and gather.source("x", 0) is None
    del gather  # collected: the descriptor it still held is closed
    with pytest.raises(OSError):
        os.fstat(files[1].fd)
    os.close(files[2].fd)


@pytest.mark.parametrize("world_size", [1, 3])
@pytest.mark.parametrize("order", ["sequential", "interleave"])
@pytest.mark.parametrize("policy", ["random", "permutation"])
def test_every_policy_and_order_reads_the_plain_batches_with_pread(gid_root: Path, every_field_read: None,
                                                                  policy: str, order: str, world_size: int) -> None:
    plain = ShardStore.open(gid_root)  # the expected batches are read through another store: its maps stay there
    for rank in range(world_size):
        store = ShardStore.open(gid_root)
        ds = RandomShardSubsetCachedDataset(store, 7, 5, policy, sample_order=order, active_shards=3, batch_size=4,
                                            rank=rank, world_size=world_size)
        with ShardLoader(ds, num_threads=2, prefetch=2, pread=True) as loader:
            for epoch in (0, 1, 2):
                loader.set_epoch(epoch)
                want = fields_at(plain, want_ids(plain, ds, epoch))
                got = {name: [] for name in FIELDS}
                for batch in loader:
                    job = loader._pipeline._jobs[0]
                    # Every field of every shard is read from its file: the store mapped nothing.
                    assert job.gather.file_fields == set(FIELDS) and job.gather.files_open > 0
                    for name in FIELDS:
                        got[name].append(batch[name].numpy().copy())
                for name in FIELDS:
                    np.testing.assert_array_equal(np.concatenate(got[name]), want[name], err_msg=f"{epoch} {name}")
        assert len(store._maps) == 0


def test_which_fields_are_read_from_files(tmp_path: Path) -> None:
    """With pread, long reads (a batch of images in file order) use it; short ones (labels, interleaved rows) and
    files the store has mapped already use maps. Without it, every field is mapped."""
    root = write_gid_cache(tmp_path / "cache", [64] * 4, (3, 64, 64))  # 12 KB images: 8 of them are 96 KB
    kinds = {}
    for order in ("sequential", "interleave"):
        for pread in (False, True):
            store = ShardStore.open(root)
            ds = RandomShardSubsetCachedDataset(store, None, 1, sample_order=order, batch_size=8)
            with ShardLoader(ds, num_threads=1, pread=pread) as loader:
                for batch in loader:
                    job = loader._pipeline._jobs[0]
                    kinds[order, pread] = (set(job.gather.file_fields), type(job.gather.source("image", 0)).__name__)
                    break
    assert kinds == {("sequential", True): ({"image"}, "FileRows"), ("interleave", True): (set(), "ndarray"),
                     ("sequential", False): (set(), "ndarray"), ("interleave", False): (set(), "ndarray")}
    fresh = ShardStore.open(root)
    mapped = fresh.field(0, "image")  # mapped (and read) by someone: a gather copies from the same map
    assert field_rows(fresh, 0, "image") is mapped
    assert isinstance(rows := field_rows(fresh, 1, "image"), kernels.FileRows)
    os.close(rows.fd)


def test_files_are_closed_when_the_loader_lets_go_and_stay_bounded(gid_root: Path, every_field_read: None,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobs, "MAX_OPEN_FILES", 4)
    store = ShardStore.open(gid_root)
    ds = RandomShardSubsetCachedDataset(store, None, 5, batch_size=8)
    before = open_fds()
    peak = peak_files = 0
    with ShardLoader(ds, num_threads=2, prepare_next_epoch=False, read_ahead_shards=0, pread=True) as loader:
        for epoch in range(2):
            loader.set_epoch(epoch)
            for _ in loader:
                peak = max(peak, open_fds() - before)
                peak_files = max(peak_files, loader._pipeline._jobs[0].gather.files_open)
            assert open_fds() == before  # the epoch is over: every file it opened is closed
        for i, _ in enumerate(loader):
            if i == 3:
                break
    assert open_fds() == before  # closed mid-epoch: close() closes them
    assert peak_files == 4  # past the bound, shards are mapped
    assert peak <= 4 + 2  # and a filler mapping one holds its descriptor only while it maps it


def test_a_shard_truncated_while_open_is_named_at_the_batch_that_reads_it(tmp_path: Path,
                                                                          every_field_read: None) -> None:
    """One shard of 512 rows; it is cut to 400 rows after the loader opened it: batches 0..49 arrive, right."""
    root = write_gid_cache(tmp_path / "cache", [512], (3, 4, 4))
    store = ShardStore.open(root)
    ds = RandomShardSubsetCachedDataset(store, None, 0, batch_size=8)
    path = store.path(0, "image")
    expected = path.stat().st_size
    seen = []
    with ShardLoader(ds, num_threads=1, prefetch=1, read_ahead_shards=0, pread=True) as loader:
        it = iter(loader)
        seen.append(next(it)["gid"].numpy().copy())
        assert isinstance(loader._pipeline._jobs[0].gather.source("image", 0), kernels.FileRows)
        os.truncate(path, expected - 112 * 48)
        with pytest.raises(CorruptShardError) as info:
            for batch in it:
                seen.append(batch["gid"].numpy().copy())
    message = str(info.value)
    assert message.startswith(f"{path}: file shrank to {expected - 112 * 48:,} bytes while open "
                              f"(expected {expected:,})")
    assert "build-manifest" in message and "\n" not in message
    assert len(seen) == 400 // 8
    np.testing.assert_array_equal(np.concatenate(seen), np.arange(400))
