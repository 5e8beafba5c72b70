"""The readers that ``test_loader_bench.py`` times, and the page-cache handling of its warm and cold rounds.

Every reader is built by a ``Case`` and read by ``consume``, which only counts the samples
of each batch, so all readers do the same work on the consumer's side.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler

from shardstore import ShardStore
from shardstore.dataset.cached import CachedTensorDataset
from shardstore.dataset.subset import RandomShardSubsetCachedDataset
from shardstore.loader import ShardLoader
from shardstore.loader.pager import evict
from shardstore.pagecache import resident_fraction

BATCH_SIZE = 64
SEED = 42
EPOCH = 0  # the epoch every throughput case reads
CHUNK = 8 << 20  # reads of the sequential-read ceiling and of the warm-up pre-read
COLD_LIMIT = 0.05  # a cold round starts with less than this fraction of its files in the page cache


@dataclass(frozen=True)
class Epoch:
    """The epoch every case reads, as its files and sizes."""

    root: Path
    num_shards: int
    shards_per_epoch: int
    shard_ids: tuple[int, ...]  # the epoch's shards, in visit order
    files: tuple[Path, ...]  # every field file of those shards
    all_files: tuple[Path, ...]  # every field file of the cache
    num_samples: int  # what one epoch hands out (whole batches)
    sample_bytes: int  # bytes of all fields of one sample

    @property
    def bytes(self) -> int:
        """Bytes of all fields of the epoch's samples: what a case reads per round."""
        return self.num_samples * self.sample_bytes

    @property
    def file_bytes(self) -> int:
        """Bytes of the epoch's files (headers included): what the sequential-read ceiling reads."""
        return sum(p.stat().st_size for p in self.files)


def describe_epoch(root: Path, shards_per_epoch: int) -> Epoch:
    store = ShardStore.open(root)
    ds = RandomShardSubsetCachedDataset(store, shards_per_epoch, SEED, batch_size=BATCH_SIZE)
    ds.set_epoch(EPOCH)
    position = {int(s): p for p, s in enumerate(store.shard_ids)}
    ids = tuple(ds.selected_shards)
    files = tuple(store.path(position[s], f) for s in ids for f in store.fields)
    all_files = tuple(store.path(p, f) for p in range(store.num_shards) for f in store.fields)
    sample_bytes = sum(spec.sample_bytes for spec in store.fields.values())
    return Epoch(root, store.num_shards, shards_per_epoch, ids, files, all_files, len(ds), sample_bytes)


def consume(batches: Iterable[dict[str, torch.Tensor]]) -> int:
    """The consumer of every case: touch each batch once (its sample count) and nothing more."""
    n = 0
    for batch in batches:
        n += batch["labels"].shape[0]
    return n


# -- page cache --------------------------------------------------------------------------------


def pre_read(paths: Sequence[Path]) -> None:
    """Read every file once, so that a warm round finds all of it in the page cache."""
    buf = bytearray(CHUNK)
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def cached_bytes(paths: Sequence[Path]) -> int:
    """Bytes of these files in the page cache (``mincore``)."""
    return int(sum(resident_fraction(p) * p.stat().st_size for p in paths))


def make_cold(evicted: Sequence[Path], checked: Sequence[Path]) -> None:
    """Drop ``evicted`` from the page cache and check that ``checked`` left it.

    Pages a live memory map still holds stay in the cache, so every reader of the previous
    round must be closed and collected before this runs.
    """
    evict(list(evicted))
    fractions = np.array([resident_fraction(p) for p in checked])
    if fractions.size and fractions.mean() >= COLD_LIMIT:
        worst = int(fractions.argmax())
        raise AssertionError(
            f"cold round: {fractions.mean():.1%} of the {len(checked)} files read are still in the page cache "
            f"after posix_fadvise(DONTNEED) (worst {checked[worst]}: {fractions[worst]:.1%}); a process or "
            "an object still maps them (a loader, store or DataLoader worker of an earlier round), or the "
            "filesystem ignores the advice (tmpfs)"
        )


# -- the readers ---------------------------------------------------------------------------------


class Case:
    """One reader of the epoch, built by ``open`` and read once per round by ``run``."""

    name = "case"

    def __init__(self, epoch: Epoch) -> None:
        self.epoch = epoch
        self.reader: Any = None

    def open(self) -> None:
        """Build the reader (no file data is read here)."""
        raise NotImplementedError

    def batches(self) -> Iterable[dict[str, torch.Tensor]]:
        """One epoch of batches."""
        return self.reader

    def run(self) -> int:
        """One timed round: the samples the consumer got."""
        return consume(self.batches())

    def close(self) -> None:
        """Stop the reader and drop every reference to it and its store, so no memory map is left."""
        self.reader = None
        gc.collect()

    @property
    def files(self) -> tuple[Path, ...]:
        """The files a round reads."""
        return self.epoch.files


class ShardLoaderCase(Case):
    """``ShardLoader`` (default settings) over the epoch of a ``RandomShardSubsetCachedDataset``."""

    def __init__(self, epoch: Epoch, num_threads: int) -> None:
        super().__init__(epoch)
        self.num_threads = num_threads
        self.name = f"ShardLoader threads={num_threads}"
        self.wait_s: list[float] = []  # the consumer's summed wait of each round

    def run(self) -> int:
        n = consume(self.batches())
        self.wait_s.append(self.reader.stats.epoch_s)
        return n

    def open(self) -> None:
        ds = RandomShardSubsetCachedDataset(ShardStore.open(self.epoch.root), self.epoch.shards_per_epoch, SEED,
                                            batch_size=BATCH_SIZE)
        self.reader = ShardLoader(ds, num_threads=self.num_threads)

    def batches(self) -> ShardLoader:
        # The loader prepared EPOCH + 1 after the previous round; asking for EPOCH again starts afresh.
        self.reader.set_epoch(EPOCH)
        return self.reader

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
        super().close()


class RandomIndexCase(Case):
    """The design ShardLoader replaced: random sample ids over the whole cache through ``DataLoader``.

    As many samples as the epoch has, drawn without replacement from every shard. The store
    keeps every field file of the cache mapped (``max_open_maps``), so the baseline does not
    pay for mapping a file again after the map cache dropped it.
    """

    def __init__(self, epoch: Epoch, num_workers: int, persistent: bool) -> None:
        super().__init__(epoch)
        self.num_workers = num_workers
        self.persistent = persistent
        self.name = f"DataLoader random ids workers={num_workers}"

    def open(self) -> None:
        store = ShardStore.open(self.epoch.root, max_open_maps=max(64, len(self.epoch.all_files)))
        ds = CachedTensorDataset(store)
        sampler = RandomSampler(ds, num_samples=self.epoch.num_samples, generator=torch.Generator().manual_seed(SEED))
        self.reader = DataLoader(ds, batch_size=BATCH_SIZE, sampler=sampler, num_workers=self.num_workers,
                                 persistent_workers=self.persistent)

    def close(self) -> None:
        _shutdown_workers(self.reader)
        super().close()

    @property
    def files(self) -> tuple[Path, ...]:
        return self.epoch.all_files


class SubsetDataLoaderCase(Case):
    """The same epoch as ShardLoader's, sample by sample through a plain ``DataLoader`` (dataset order)."""

    def __init__(self, epoch: Epoch, num_workers: int, persistent: bool) -> None:
        super().__init__(epoch)
        self.num_workers = num_workers
        self.persistent = persistent
        self.name = f"DataLoader shard subset workers={num_workers}"

    def open(self) -> None:
        ds = RandomShardSubsetCachedDataset(ShardStore.open(self.epoch.root), self.epoch.shards_per_epoch, SEED,
                                            batch_size=BATCH_SIZE)
        ds.set_epoch(EPOCH)
        self.reader = DataLoader(ds, batch_size=BATCH_SIZE, num_workers=self.num_workers,
                                 persistent_workers=self.persistent)

    def close(self) -> None:
        _shutdown_workers(self.reader)
        super().close()


def _shutdown_workers(loader: DataLoader | None) -> None:
    """End a DataLoader's persistent workers now: they keep the shard files mapped while they live."""
    it = getattr(loader, "_iterator", None)
    if it is not None and hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()
    if loader is not None:
        loader._iterator = None


CASES: dict[str, Callable[[Epoch], Case]] = {
    "shardloader_t1": lambda e: ShardLoaderCase(e, 1),
    "shardloader_t2": lambda e: ShardLoaderCase(e, 2),
    "random_ids_w0": lambda e: RandomIndexCase(e, 0, persistent=False),
    "random_ids_w2": lambda e: RandomIndexCase(e, 2, persistent=False),
    "subset_dataloader_w2": lambda e: SubsetDataLoaderCase(e, 2, persistent=False),
}


def make_case(key: str, epoch: Epoch, mode: str) -> Case:
    """The reader ``key``; a warm reader with workers keeps them between rounds (they start in the warm-up)."""
    case = CASES[key](epoch)
    if mode == "warm" and getattr(case, "num_workers", 0) > 0:
        case.persistent = True
    return case
