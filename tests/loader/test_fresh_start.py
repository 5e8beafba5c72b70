"""What a fresh loader costs before its first batch, and what it does not do twice: the first batch is out before
the rest of its chunk, the ring is one region of aligned buffers, threads start before any of them works, and the
pager does not populate a map it populated before."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from shardstore import ShardStore, kernels
from shardstore.dataset.subset import RandomShardSubsetCachedDataset
from shardstore.loader import ShardLoader, pager
from shardstore.loader.slots import make_slots
from shardstore.manifest.model import FieldSpec


def test_the_first_batch_is_handed_out_before_the_rest_of_its_chunk(store: ShardStore,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """After a fresh start, batch 0 does not wait for the other batches of the first chunk."""
    release = threading.Event()
    real = kernels.BatchGather.gather

    def gather(self, source_index, rows, buffers, first=0):
        if first % loader._pipeline.chunk or source_index.size > buffers.batch_size:  # all but batch 0 wait
            release.wait(10)
        return real(self, source_index, rows, buffers, first)

    monkeypatch.setattr(kernels.BatchGather, "gather", gather)
    ds = RandomShardSubsetCachedDataset(store, None, 5, batch_size=4)
    loader = ShardLoader(ds, num_threads=1, read_ahead_shards=0)
    assert loader._pipeline.chunk > 1
    got: list[np.ndarray] = []
    consumer = threading.Thread(target=lambda: got.append(next(iter(loader))["gid"].numpy().copy()))
    consumer.start()
    consumer.join(5)
    try:
        assert got and np.array_equal(got[0], ds.indices()[:4]), "the first batch waited for its whole chunk"
    finally:
        release.set()
        consumer.join(5)
        loader.close()


def test_the_ring_is_one_region_of_aligned_writeable_buffers() -> None:
    fields = {"image": FieldSpec(np.dtype(np.uint8), (3, 5, 5)), "label": FieldSpec(np.dtype(np.int64), ())}
    slots = make_slots(fields, 6, 5, pin_memory=False, cuda=False)
    spans = []
    for slot in slots:
        for name, arr in slot.arrays.items():
            assert arr.flags.writeable and arr.flags.c_contiguous and arr.ctypes.data % 4096 == 0
            assert slot.host[name].data_ptr() == arr.ctypes.data and slot.host[name].shape == (6, *fields[name].shape)
            spans.append((arr.ctypes.data, arr.ctypes.data + arr.nbytes))
            arr[...] = 1
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # no two buffers overlap


def test_every_thread_is_started_before_any_works(store: ShardStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A filler at work holds the GIL that the next Thread.start waits for: no work begins until all have started."""
    started: list[str] = []
    real_start = threading.Thread.start

    def start(self: threading.Thread) -> None:
        real_start(self)
        started.append(self.name)

    planned_after: list[int] = []
    ds = RandomShardSubsetCachedDataset(store, None, 5, batch_size=4)
    real_plan = ds.rank_plan

    def rank_plan(*args: object, **kwargs: object):
        planned_after.append(len([n for n in started if n.startswith("shardstore-")]))
        return real_plan(*args, **kwargs)

    monkeypatch.setattr(threading.Thread, "start", start)
    monkeypatch.setattr(ds, "rank_plan", rank_plan)
    with ShardLoader(ds, num_threads=2, read_ahead_shards=1) as loader:
        assert sum(1 for _ in loader) == len(loader)
    assert planned_after and planned_after[0] == 3  # two fillers and the pager were running first


def test_a_populated_map_is_not_populated_again(store: ShardStore, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = pager._advise

    def advise(arr: np.ndarray, advice: int) -> bool:
        if advice == pager.MADV_POPULATE_READ:
            calls.append(id(arr))
        return real(arr, advice)

    monkeypatch.setattr(pager, "_advise", advise)
    arrays = [store.field(0, "image"), store.field(1, "image")]
    paths = [store.path(0, "image"), store.path(1, "image")]
    pager.read_ahead(arrays, paths)
    pager.read_ahead(arrays, paths)  # the store handed out the same maps: their pages are mapped in already
    assert len(calls) == 2
    pager.drop_pages(arrays[:1], paths[:1])  # their pages left the process: populated again when read ahead
    pager.read_ahead(arrays, paths)
    assert calls == [id(arrays[0]), id(arrays[1]), id(arrays[0])]
    assert not pager._was_populated(np.zeros(4))
