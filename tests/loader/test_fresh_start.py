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


@pytest.mark.slow
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


def test_the_next_epoch_is_read_ahead_only_once_this_ones_batches_are_claimed(store: ShardStore,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A process that ends with its epoch never reads the next one: its pages must not compete with this one's."""
    ds = RandomShardSubsetCachedDataset(store, 3, 5, batch_size=1)  # ~90 batches: more than the ring holds
    epochs = [{int(np.flatnonzero(store.shard_ids == i)[0]) for i in ds.set_epoch(e)} for e in (1, 0)][::-1]
    next_only = {store.path(p, name) for p in epochs[1] - epochs[0] for name in store.fields}
    assert next_only
    seen: list[tuple[set, int]] = []  # each read-ahead: its files, and the batches claimed when it was made
    real = pager.read_ahead

    def read_ahead(arrays, paths, **kwargs):
        seen.append((set(paths), loader._pipeline._claim_seq))  # epoch 0 is batches 0 .. len(loader) - 1
        return real(arrays, paths, **kwargs)

    monkeypatch.setattr(pager, "read_ahead", read_ahead)
    with ShardLoader(ds, num_threads=1, prefetch=1, read_ahead_shards=2) as loader:
        batches = 0
        for _ in loader:  # a consumer slower than the loader: claims wait for free slots
            batches += 1
            threading.Event().wait(0.002)
        assert batches == len(loader) > 2 * len(loader._pipeline.slots)
        for _ in range(500):  # the next epoch's first shards are read ahead once this one is claimed
            if any(paths & next_only for paths, _ in seen):
                break
            threading.Event().wait(0.01)
    assert any(paths & next_only for paths, _ in seen)
    assert not [claimed for paths, claimed in seen if paths & next_only and claimed < batches]
