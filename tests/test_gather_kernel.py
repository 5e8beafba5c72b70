"""The gather kernel copies exactly what its NumPy reference copies, batch by batch and field by field."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shardstore import kernels, pagecache, reference
from shardstore.loader.pager import evict

DTYPES = [np.uint8, np.int16, np.int64, np.float16, np.float32, np.float64]
SHAPES = [(), (3,), (2, 3), (3, 8, 8), (1, 40_000)]  # the last one: runs long enough for streaming stores


def _sources(rng: np.random.Generator, counts: list[int], dtype, shape) -> list[np.ndarray]:
    out = []
    for n in counts:
        raw = rng.integers(0, 255, size=(n, *shape)).astype(dtype)
        raw.flags.writeable = False  # like the read-only shard maps
        out.append(raw)
    return out


def _batch_ids(data: st.DataObject, counts: list[int], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Sample ids as (source, row): a mix of sequential runs across shard boundaries and random picks."""
    flat = [(j, r) for j, c in enumerate(counts) for r in range(c)]
    if data.draw(st.booleans()):
        start = data.draw(st.integers(0, len(flat) - 1))
        picks = [flat[(start + k) % len(flat)] for k in range(n)]
    else:
        picks = [flat[i] for i in data.draw(st.lists(st.integers(0, len(flat) - 1), min_size=n, max_size=n))]
    return np.array([p[0] for p in picks], np.int64), np.array([p[1] for p in picks], np.int64)


@given(
    counts=st.lists(st.integers(1, 12), min_size=1, max_size=6),
    dtype=st.sampled_from(DTYPES),
    shape=st.sampled_from(SHAPES),
    n=st.integers(0, 30),
    data=st.data(),
)
def test_gather_rows_matches_reference(counts, dtype, shape, n, data) -> None:
    rng = np.random.default_rng(len(counts) * 31 + n)
    sources = _sources(rng, counts, dtype, shape)
    ids = _batch_ids(data, counts, n)
    got = np.full((n, *shape), 7, dtype)
    want = np.full((n, *shape), 7, dtype)
    kernels.gather_rows(sources, *ids, got)
    reference.gather_rows(sources, *ids, want)
    np.testing.assert_array_equal(got, want)


@given(
    counts=st.lists(st.integers(1, 20), min_size=1, max_size=5),
    batch_size=st.integers(1, 9),
    num_batches=st.integers(1, 4),
    data=st.data(),
)
def test_batch_gather_fills_every_field_of_consecutive_batches(counts, batch_size, num_batches, data) -> None:
    rng = np.random.default_rng(sum(counts))
    fields = {"img": (np.dtype(np.uint8), (3, 4, 4)), "label": (np.dtype(np.int64), ()),
              "emb": (np.dtype(np.float16), (5,))}
    sources = {name: _sources(rng, counts, dtype, shape) for name, (dtype, shape) in fields.items()}
    opened: list[tuple[str, int]] = []

    def open_source(name: str, j: int) -> np.ndarray:
        opened.append((name, j))
        return sources[name][j]

    gather = kernels.BatchGather(np.array(counts), fields, open_source)
    ring = 6
    buffers = kernels.BatchBuffers(
        [{name: np.zeros((batch_size, *shape), dtype) for name, (dtype, shape) in fields.items()} for _ in range(ring)],
        fields, batch_size)
    n = data.draw(st.integers((num_batches - 1) * batch_size + 1, num_batches * batch_size))
    source, rows = _batch_ids(data, counts, n)
    first = data.draw(st.integers(0, ring - num_batches))
    gather.gather(source, rows, buffers, first)
    for name in fields:
        want = np.stack([sources[name][j][r] for j, r in zip(source, rows)])
        got = np.concatenate([buffers.buffers[first + b][name] for b in range(num_batches)])[:n]
        np.testing.assert_array_equal(got, want)
    # Each shard's field is opened once, and only when one of its rows is needed.
    assert len(opened) == len(set(opened)) == len(fields) * len(set(source.tolist()))


def test_gather_rejects_bad_arguments() -> None:
    src = [np.zeros((4, 2), np.float32)]
    out = np.zeros((2, 2), np.float32)
    ok = np.array([0, 0], np.int64), np.array([1, 3], np.int64)
    with pytest.raises(TypeError, match="sources\\[0\\] is float64 rows of \\(2,\\), out is float32"):
        kernels.gather_rows([np.zeros((4, 2))], *ok, out)
    with pytest.raises(TypeError, match="source_index must be a 1-D int64 array"):
        kernels.gather_rows(src, np.array([0, 0], np.int32), ok[1], out)
    with pytest.raises(TypeError, match="writeable and C-contiguous"):
        kernels.gather_rows(src, *ok, np.zeros((2, 4), np.float32)[:, ::2])
    with pytest.raises(IndexError, match="sample 1: row 4 of source 0 is out of range"):
        kernels.gather_rows(src, ok[0], np.array([0, 4], np.int64), out)
    with pytest.raises(IndexError, match="row 0 of source 1 is out of range"):
        kernels.gather_rows(src, np.array([1, 0], np.int64), np.array([0, 0], np.int64), out)
    with pytest.raises(ValueError, match="differ in length"):
        kernels.gather_rows(src, ok[0], np.array([0], np.int64), out)


def test_batch_gather_checks_what_it_opens() -> None:
    fields = {"x": (np.dtype(np.int64), (2,))}
    gather = kernels.BatchGather(np.array([3]), fields, lambda name, j: np.zeros((4, 2), np.int64))
    buffers = kernels.BatchBuffers([{"x": np.zeros((2, 2), np.int64)}], fields, 2)
    with pytest.raises(ValueError, match=r"source 0 of field 'x' is \(4, 2\) int64, expected \(3, 2\) int64"):
        gather.gather(np.array([0, 0], np.int64), np.array([0, 1], np.int64), buffers)
    with pytest.raises(ValueError, match="do not fit the 1 buffers"):
        gather.gather(np.zeros(3, np.int64), np.zeros(3, np.int64), buffers)
    with pytest.raises(TypeError, match="buffer 0 field 'x' is \\(3, 2\\) int64, expected \\(2, 2\\) int64"):
        kernels.BatchBuffers([{"x": np.zeros((3, 2), np.int64)}], fields, 2)


def test_resident_fraction_sees_evicted_pages(tmp_path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(np.random.default_rng(0).bytes(4 << 20))
    with open(path, "rb") as f:
        f.read()
    assert pagecache.resident_fraction(path) > 0.9
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    evict([path])
    if pagecache.resident_fraction(path) > 0.5:
        pytest.skip("this filesystem keeps evicted pages (tmpfs?)")
    assert pagecache.resident_fraction(path) < 0.1


FIELDS = {"img": (np.dtype(np.uint8), (3, 4, 4)), "label": (np.dtype(np.int64), ()),
          "emb": (np.dtype(np.float16), (5,))}


def _gather_over(counts: list[int], rng: np.random.Generator) -> tuple[kernels.BatchGather, dict]:
    sources = {name: _sources(rng, counts, dtype, shape) for name, (dtype, shape) in FIELDS.items()}
    return kernels.BatchGather(np.array(counts), FIELDS, lambda name, j: sources[name][j]), sources


def test_buffers_listing_the_fields_in_another_order_are_matched_by_name() -> None:
    """The same fields in another order once made the kernel write past a buffer; now they are matched by name."""
    rng = np.random.default_rng(1)
    gather, sources = _gather_over([7, 9], rng)
    reordered = dict(reversed(list(FIELDS.items())))
    guard = 64  # bytes after each buffer that must stay untouched
    raw = {name: np.full((4 * np.prod(shape, dtype=int) * dtype.itemsize + guard,), 0xAB, np.uint8)
           for name, (dtype, shape) in reordered.items()}
    bufs = {name: raw[name][:-guard].view(dtype).reshape(4, *shape) for name, (dtype, shape) in reordered.items()}
    buffers = kernels.BatchBuffers([bufs], reordered, 4)
    source, rows = np.array([0, 0, 1, 1], np.int64), np.array([5, 6, 0, 8], np.int64)
    gather.gather(source, rows, buffers)
    for name in FIELDS:
        want = np.stack([sources[name][j][r] for j, r in zip(source, rows)])
        np.testing.assert_array_equal(bufs[name], want)
        assert (raw[name][-guard:] == 0xAB).all(), f"{name}: bytes past the buffer were written"


def test_buffers_that_lack_a_field_or_hold_it_otherwise_are_refused() -> None:
    gather, _ = _gather_over([4], np.random.default_rng(2))
    ids = np.zeros(2, np.int64), np.array([0, 1], np.int64)
    lacking = {k: v for k, v in FIELDS.items() if k != "emb"}
    buffers = kernels.BatchBuffers([{n: np.zeros((2, *s), d) for n, (d, s) in lacking.items()}], lacking, 2)
    with pytest.raises(ValueError, match="buffers hold no field 'emb'"):
        gather.gather(*ids, buffers)
    other = {**FIELDS, "emb": (np.dtype(np.float16), (6,))}
    buffers = kernels.BatchBuffers([{n: np.zeros((2, *s), d) for n, (d, s) in other.items()}], other, 2)
    with pytest.raises(ValueError,
                       match=r"buffers hold field 'emb' as \(6,\) float16, the gather copies \(5,\) float16"):
        gather.gather(*ids, buffers)
    with pytest.raises(TypeError, match="buffers must be a BatchBuffers"):
        gather.gather(*ids, [{}])


def test_the_kernel_refuses_a_copy_past_a_buffer_or_a_source() -> None:
    """The compiled gather gets every size: a destination or source too small is refused, nothing is written."""
    from cshard import _kernels

    src = np.arange(40, dtype=np.int64).reshape(10, 4)
    dst = np.full(16, -1, np.int64)  # room for 4 rows of 4, the call claims 2 batches of 3 rows
    bases = np.array([[src.ctypes.data]], np.uint64)
    src_bytes = np.array([[src.nbytes]], np.uint64)
    out = np.array([[dst.ctypes.data], [dst.ctypes.data + 3 * 32]], np.uint64)
    info = np.zeros(4, np.int64)
    args = (bases, src_bytes, np.array([10], np.int64), np.array([32], np.int64),
            np.zeros(6, np.int64), np.arange(6, dtype=np.int64), 3)
    status = _kernels.gather_batches(*args, out, np.array([[3 * 32], [32]], np.uint64), info)
    assert status == _kernels.OUT_SHORT and info[0] == 3  # batch 1 has room for 1 row, not 3
    np.testing.assert_array_equal(dst[12:], -1)
    short = np.array([[src.nbytes - 32]], np.uint64)  # the source claims a row it does not have
    info[:] = 0
    status = _kernels.gather_batches(bases, short, *args[2:4], np.zeros(1, np.int64), np.array([9], np.int64), 3,
                                     out, np.array([[96], [96]], np.uint64), info)
    assert status == _kernels.SRC_SHORT and tuple(info[:3]) == (0, 0, 0)


def test_maps_hold_no_descriptor_and_unmap_with_their_last_view(tmp_path) -> None:
    from pathlib import Path

    from shardstore.store.mmaps import map_array

    path = tmp_path / "x.npy"
    np.save(path, np.arange(3000, dtype=np.int32).reshape(1000, 3))
    fds = len(os.listdir("/proc/self/fd"))
    arr, st = map_array(Path(path), np.dtype(np.int32), (1000, 3), 128)
    assert len(os.listdir("/proc/self/fd")) == fds
    assert st.st_size == 128 + arr.nbytes
    assert not arr.flags.writeable and arr[999, 2] == 2999
    with pytest.raises(ValueError, match="read-only"):
        arr[0, 0] = 1
    np.testing.assert_array_equal(kernels.copy_from_map(arr[10:12]), [[30, 31, 32], [33, 34, 35]])
    row = arr[5]
    del arr, st

    def mapped() -> bool:
        with open("/proc/self/maps") as f:
            return any(str(path) in line for line in f)

    assert mapped()  # a view keeps the map
    del row
    assert not mapped()
