"""``ShardLoader``: an epoch's batches gathered from the shard maps into reused buffers ahead of the consumer."""

from __future__ import annotations

import time
import weakref
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from shardstore.dataset.cached import CachedTensorDataset
from shardstore.dataset.subset import RandomShardSubsetCachedDataset
from shardstore.errors import ConfigError
from shardstore.loader import gil
from shardstore.loader.pipeline import Pipeline
from shardstore.loader.slots import chunk_batches, make_slots, ring_size
from shardstore.loader.stats import WaitStats
from shardstore.manifest.reader import ShardStore
from shardstore.sampling.plan import RankPlan, whole_store_plan

_STOP_WAIT_S = 0.5


def _positive(name: str, value: object, *, zero: bool = False) -> int:
    low = 0 if zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def _resolve_device(device: str | torch.device | None) -> torch.device | None:
    if device is None:
        return None
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device {device!r} is not a torch device ({exc}); use 'cpu' or 'cuda[:N]'") from None
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        raise ConfigError(f"device {str(device)!r} is not supported; use 'cpu' or 'cuda[:N]'")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {str(device)!r} asked for, but this torch build sees no CUDA device; "
                          "use device='cpu' or install a CUDA build of torch")
    return torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())


@dataclass(frozen=True)
class _Planner:
    """Plans the epoch a key names, on a filler thread: ``(epoch, start_batch)`` is a dataset's part for
    this rank, ``"all"`` a whole store in id order (the dataset's store as it is then).

    It holds no reference to the loader: the threads hold it, and the loader's garbage collection is
    what stops them.
    """

    source: RandomShardSubsetCachedDataset | CachedTensorDataset | ShardStore
    batch_size: int
    drop_last: bool

    def __call__(self, key: Hashable) -> RankPlan:
        source = self.source
        if isinstance(source, RandomShardSubsetCachedDataset):
            epoch, start_batch, _ = key
            return source.rank_plan(epoch, start_batch)
        store = source.store if isinstance(source, CachedTensorDataset) else source
        return whole_store_plan(store, self.batch_size, self.drop_last)


class ShardLoader:
    """Batches of a shard-epoch dataset as ``{field: tensor}``, in exactly the dataset's order.

    ``num_threads`` background threads gather each batch from the shard memory maps into one
    of ``prefetch + 1`` preallocated buffers (page-locked when ``pin_memory``, the default when
    CUDA is available), with the GIL released; a pager thread reads the next
    ``read_ahead_shards`` shards into the page cache ahead of use. When the consumer takes
    the last batch of an epoch, the threads are already gathering the first batches of the
    next one (``prepare_next_epoch``), so ``set_epoch(e + 1)`` finds them ready.

    On ``device='cuda'``, each batch is copied to the GPU on a side stream as soon as it is
    gathered; the consumer gets device tensors that are ready on its current stream, and
    may keep them. On the CPU, the consumer gets views of the reused buffers: valid until
    it asks for the next batch (``.clone()`` what you keep).

    ``pread=True`` reads the bulk fields (those a batch reads in runs of 64 KiB or more: images
    in file order) of shards the store has not mapped with ``pread`` straight into the buffers,
    holding each shard's files open while it is read (at most 64 per epoch in flight), and
    copies the rest from maps. For file systems where page faults on a memory map are slow;
    on the local ext4 disks of the 2-core VMs, a fresh map and ``pread`` cost the same, and
    maps already read through in this process are faster, so maps are the default.

    While it iterates, the interpreter's GIL switch interval is lowered to
    ``gil_switch_interval_s`` (see ``shardstore.loader.gil``; None leaves it alone), so a
    consumer busy in Python does not starve the threads.

    ``dataset`` is a ``RandomShardSubsetCachedDataset`` (its ``batch_size``, rank split and
    ``max_steps_per_epoch`` apply), or a ``CachedTensorDataset`` / ``ShardStore``, read
    whole in sample-id order (``drop_last`` decides about a short final batch).
    """

    def __init__(
        self,
        dataset: RandomShardSubsetCachedDataset | CachedTensorDataset | ShardStore,
        batch_size: int | None = None,
        *,
        device: str | torch.device | None = None,
        num_threads: int = 2,
        prefetch: int = 4,
        drop_last: bool = True,
        pin_memory: bool | None = None,
        read_ahead_shards: int = 2,
        drop_pages: bool = False,
        prepare_next_epoch: bool = True,
        gil_switch_interval_s: float | None = 0.0005,
        pread: bool = False,
    ) -> None:
        if isinstance(dataset, RandomShardSubsetCachedDataset):
            if batch_size is not None and batch_size != dataset.batch_size:
                raise ConfigError(f"batch_size {batch_size!r} differs from the dataset's {dataset.batch_size}; "
                                  "the dataset splits global batches over ranks, so give it the batch size "
                                  "(or leave ShardLoader's batch_size unset)")
            batch_size = dataset.batch_size
            store = dataset.store
        elif isinstance(dataset, (CachedTensorDataset, ShardStore)):
            store = dataset.store if isinstance(dataset, CachedTensorDataset) else dataset
            if batch_size is None:
                raise ConfigError("batch_size is required when reading a whole CachedTensorDataset or ShardStore")
        else:
            raise ConfigError(f"ShardLoader reads a RandomShardSubsetCachedDataset, CachedTensorDataset or "
                              f"ShardStore, got {type(dataset).__name__}; use torch.utils.data.DataLoader for others")
        self.dataset = dataset
        self.store = store
        self.batch_size = _positive("batch_size", batch_size)
        _positive("num_threads", num_threads)
        _positive("prefetch", prefetch)
        _positive("read_ahead_shards", read_ahead_shards, zero=True)
        self.drop_last = bool(drop_last)
        self.prepare_next_epoch = bool(prepare_next_epoch)
        if gil_switch_interval_s is not None and not 0 < gil_switch_interval_s <= 1:
            raise ConfigError(f"gil_switch_interval_s must be in (0, 1] seconds or None, got {gil_switch_interval_s!r}")
        self.gil_switch_interval_s = gil_switch_interval_s
        self.device = _resolve_device(device)
        if pin_memory is None:
            pin_memory = torch.cuda.is_available()
        elif pin_memory and not torch.cuda.is_available():
            raise ConfigError("pin_memory=True needs CUDA, which this torch build does not see; "
                              "leave pin_memory unset to decide automatically")
        self.pin_memory = bool(pin_memory)
        chunk = chunk_batches(store.fields, self.batch_size)
        slots = make_slots(store.fields, self.batch_size, ring_size(chunk, num_threads, prefetch),
                           pin_memory=self.pin_memory, cuda=self.device is not None)
        self._pipeline = Pipeline(store.fields, _Planner(dataset, self.batch_size, self.drop_last), slots, chunk,
                                  num_threads=num_threads, device=self.device, read_ahead_shards=read_ahead_shards,
                                  drop_pages=bool(drop_pages), pread=bool(pread))
        self._finalizer = weakref.finalize(self, self._pipeline.close)
        remote = store.remote
        self.stats = WaitStats(remote_clock=(lambda: remote.stats.remote_wait_s) if remote is not None else None)
        """Consumer wait times (see ``WaitStats``): ``remote_s`` for object storage, ``local_s`` for the rest."""
        self._steps_key: Hashable = None
        self._steps_done = 0

    # -- what an iteration reads ----------------------------------------------------------------

    def _current(self) -> tuple[Hashable, Hashable]:
        """The key of the epoch an iteration reads now, and of the one expected after it."""
        ds = self.dataset
        if isinstance(ds, RandomShardSubsetCachedDataset):
            # The store's version is part of the key: a next epoch prepared before set_epoch moved the
            # dataset to a newer manifest snapshot (refresh_manifest) is planned again, not reused.
            epoch, start, version = ds.epoch, ds.start_batch, ds.store_version
            return (epoch, start, version), (epoch + 1, 0, version)
        return "all", "all"

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        key, following = self._current()
        pipeline = self._pipeline
        with gil.switch_interval(self.gil_switch_interval_s):
            # Lowered before the threads start: each Thread.start waits until its thread runs, which
            # needs the GIL, and a filler started before it may hold that for a whole switch interval.
            job, generation = pipeline.begin(key, following if self.prepare_next_epoch else None)
            completed = False
            try:
                num_batches = pipeline.num_batches(job, generation)
                self._steps_key, self._steps_done = key, 0
                self.stats.start_epoch(num_batches)
                for batch in range(num_batches):
                    start = time.perf_counter()
                    out = pipeline.take(job, batch, generation)
                    self.stats.record(time.perf_counter() - start)
                    self._steps_done += 1
                    yield out
                completed = True
            finally:
                if completed:
                    pipeline.finish(job)
                elif generation == pipeline.generation:
                    # A break, an error in the loop body, KeyboardInterrupt or garbage collection:
                    # do not hold the consumer up for a thread stuck in slow storage.
                    pipeline.stop(timeout=_STOP_WAIT_S)

    @property
    def warm_starts(self) -> int:
        """Iterations whose first batches were already being prepared when they began."""
        return self._pipeline.warm_starts

    def __len__(self) -> int:
        """Batches the next iteration yields."""
        if isinstance(self.dataset, RandomShardSubsetCachedDataset):
            return len(self.dataset) // self.batch_size
        full, rest = divmod(self.store.num_samples, self.batch_size)
        return full + (rest > 0 and not self.drop_last)

    # -- pass-through to the dataset ------------------------------------------------------------

    def _subset(self, what: str) -> RandomShardSubsetCachedDataset:
        if not isinstance(self.dataset, RandomShardSubsetCachedDataset):
            raise ConfigError(f"{what} needs a RandomShardSubsetCachedDataset; this loader reads "
                              f"{type(self.dataset).__name__} whole, in one fixed order")
        return self.dataset

    def set_epoch(self, epoch: int, *, generation: int | None = None) -> list[int]:
        """Make ``epoch`` the dataset's current epoch (its first batches are usually ready already); its shard ids.

        ``generation``: see ``RandomShardSubsetCachedDataset.set_epoch`` (``refresh_manifest``).
        """
        return self._subset("set_epoch").set_epoch(epoch, generation=generation)

    @property
    def epoch(self) -> int:
        return self._subset("epoch").epoch

    @property
    def steps_per_epoch(self) -> int:
        """Batches in a full epoch, after the dataset's ``max_steps_per_epoch``."""
        if isinstance(self.dataset, RandomShardSubsetCachedDataset):
            return self.dataset.steps_per_epoch
        return len(self)

    @property
    def max_steps_per_epoch(self) -> int | None:
        return self.dataset.max_steps_per_epoch if isinstance(self.dataset, RandomShardSubsetCachedDataset) else None

    def state_dict(self) -> dict[str, Any]:
        """The dataset's resumable state after the batches this loader handed out in the current epoch."""
        ds = self._subset("state_dict")
        steps = self._steps_done if self._steps_key == (ds.epoch, ds.start_batch, ds.store_version) else 0
        return ds.state_dict(steps_done=steps)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``: the next iteration starts at the batch after the last one taken."""
        self._subset("load_state_dict").load_state_dict(state)
        self._steps_key, self._steps_done = None, 0

    # -- lifetime -----------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the background threads and let go of the maps and files they held (also done at garbage collection).

        Maps hold no file descriptor; the store's own cache keeps at most ``max_open_maps``.
        """
        self._finalizer()

    def __enter__(self) -> ShardLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"ShardLoader({type(self.dataset).__name__}, batch_size={self.batch_size}, "
                f"device={str(self.device or 'cpu')!r}, pin_memory={self.pin_memory})")

