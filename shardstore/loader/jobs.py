"""One pass of the loader over a rank's plan: which shards it reads, when, and a gather per field over them."""

from __future__ import annotations

import resource
import threading
from collections.abc import Hashable
from dataclasses import dataclass, field

import numpy as np

from shardstore.kernels import BatchGather
from shardstore.manifest.reader import ShardStore
from shardstore.sampling.plan import RankPlan
from shardstore.store.mmaps import field_rows

#: With ``pread``, a field is read from its files when a job's reads of it move at least this many
#: bytes on average (a batch of 64 images of 3x64x64 is one 786 KB read in file order). Shorter reads
#: (labels, the single rows of an interleaved order) copy from memory maps: a system call per read
#: would cost more than the page faults it saves.
PREAD_MIN_BYTES = 64 << 10
#: At most this many shard files open for ``pread`` per job (and an eighth of the descriptor limit);
#: past it, shards are mapped (a map holds no descriptor).
MAX_OPEN_FILES = 64


def open_files_limit() -> int:
    """Files a job may hold open: ``MAX_OPEN_FILES``, or an eighth of ``RLIMIT_NOFILE`` when that is lower."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return MAX_OPEN_FILES if soft == resource.RLIM_INFINITY else max(0, min(MAX_OPEN_FILES, soft // 8))


def mean_run(source_index: np.ndarray, rows: np.ndarray, batch_size: int) -> float:
    """Samples per read: a read is a run of consecutive rows of one shard inside one batch."""
    n = source_index.size
    if n == 0:
        return 0.0
    starts = np.empty(n, bool)
    starts[0] = True
    np.not_equal(source_index[1:], source_index[:-1], out=starts[1:])
    starts[1:] |= rows[1:] != rows[:-1] + 1
    starts[::batch_size] = True
    return n / int(np.count_nonzero(starts))


@dataclass
class Job:
    """An epoch (or the rest of one) as the pipeline sees it; planned lazily by a background thread.

    Batch ``b`` of the job is samples ``[b*batch_size, (b+1)*batch_size)`` of its plan and is
    the pipeline's batch number ``first_seq + b``.
    """

    key: Hashable
    #: read fields in long runs with pread from shard files the store has not mapped (else: maps only)
    pread: bool = False
    planned: bool = False
    #: the consumer took a batch of it: a new iteration cannot take it over
    started: bool = False
    planning: bool = False
    error: BaseException | None = None
    first_seq: int = 0
    batch_size: int = 1
    num_batches: int = 0
    num_samples: int = 0
    #: the store the plan indexes: every shard of this job is read through it
    store: ShardStore | None = None
    #: shard positions this job reads, in the order it first touches them
    visited: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    #: for every sample of the job: index into ``visited``, and row within that shard
    source_index: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    rows: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    #: per visited shard: the first and last batch that reads it (``first_batch`` never decreases)
    first_batch: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    last_batch: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    gather: BatchGather | None = None
    #: pager progress: shards advised ahead of use (a prefix of ``visited``), shards whose pages were dropped
    advised: int = 0
    claimed_shards: int = 0  # shards the fillers have reached (the pager reads ahead of them)
    dropped: np.ndarray = field(default_factory=lambda: np.empty(0, bool))
    #: visited shards whose maps this job let go of (no batch still to be filled reads them)
    unmapped: np.ndarray = field(default_factory=lambda: np.empty(0, bool))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def plan(self, plan: RankPlan) -> None:
        """Take ``plan`` as it is (its shards, rows and spans) and set up the per-field gathers.

        O(visited shards) (with ``pread``, one pass over the rows: how long its reads are): nothing
        is located or sorted, and files open lazily, on first use.
        """
        batch_size = plan.batch_size
        num_batches = -(-plan.num_samples // batch_size)
        if plan.num_batches != num_batches:
            raise ValueError(f"a plan of {plan.num_samples} samples in batches of {batch_size} has {num_batches} "
                             f"batches, not {plan.num_batches}")
        self.store = plan.store
        self.batch_size, self.num_samples, self.num_batches = batch_size, plan.num_samples, num_batches
        self.visited, self.source_index, self.rows = plan.visited, plan.source_index, plan.rows
        self.first_batch = plan.first_sample // batch_size
        self.last_batch = plan.last_sample // batch_size
        self.dropped = np.zeros(self.visited.size, bool)
        self.unmapped = np.zeros(self.visited.size, bool)
        store, visited = plan.store, plan.visited
        if store.remote is not None:  # the shards of a cache in object storage are fetched ahead in visit order
            store.remote.offer(store.manifest, visited, tuple(store.manifest.fields))
        counts = store.offsets[visited + 1] - store.offsets[visited]
        # Sources open through the plan's store (no reference back to the job: it is dropped when done).
        # With pread, fields read in long runs are read from their files (a shard the store has mapped
        # already is copied from its map); the others are mapped.
        file_fields: tuple[str, ...] = ()
        if self.pread:
            run = mean_run(plan.source_index, plan.rows, batch_size)
            file_fields = tuple(name for name, spec in store.fields.items()
                                if run * spec.sample_bytes >= PREAD_MIN_BYTES)
        self.gather = BatchGather(counts, {name: (spec.dtype, spec.shape) for name, spec in store.fields.items()},
                                  lambda name, j: store.field(int(visited[j]), name),
                                  open_file=lambda name, j: field_rows(store, int(visited[j]), name),
                                  file_fields=file_fields, max_files=open_files_limit() if file_fields else 0)

    def batch_bounds(self, batch: int, count: int = 1) -> tuple[int, int]:
        """Sample range of batches ``batch .. batch + count - 1``."""
        start = batch * self.batch_size
        return start, min(start + count * self.batch_size, self.num_samples)

    def take_finished(self, done_batches: int | None = None) -> np.ndarray:
        """Visited shards no batch before ``done_batches`` (None: any batch) still needs, not dropped before."""
        finished = ~self.dropped if done_batches is None else (self.last_batch < done_batches) & ~self.dropped
        which = np.flatnonzero(finished)
        self.dropped[which] = True
        return which

    def unmap(self, which: np.ndarray) -> None:
        """Let go of these visited shards' maps and files: no batch still to be filled may read them.

        Files are closed now; maps are unmapped once the store's cache (bounded by
        ``max_open_maps``) drops them too, so the maps alive stay bounded however many shards an
        epoch visits.
        """
        if self.gather is None:
            return
        remote = self.store is not None and self.store.remote is not None
        for j in which.tolist():
            if not self.unmapped[j]:
                self.unmapped[j] = True
                self.gather.release(j)
                if remote:  # a shard of object storage stays pinned in the local cache while the store maps it
                    self.store.release(int(self.visited[j]))

    def unmap_finished(self, done_batches: int) -> None:
        """Let go of the maps of shards that only batches before ``done_batches`` read."""
        if self.num_batches:
            self.unmap(np.flatnonzero((self.last_batch < done_batches) & ~self.unmapped))

    def shards_needed_by(self, batch: int) -> int:
        """How many of the visited shards (in visit order) batch ``batch`` and those before it touch."""
        if self.num_batches == 0:
            return 0
        return int(np.searchsorted(self.first_batch, batch, side="right"))
