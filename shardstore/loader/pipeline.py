"""The loader's engine: background threads fill a ring of reused batch slots, in order, ahead of the consumer.

Batches carry a running number (``seq``) across jobs, so the threads run straight from
the end of one epoch into the start of the next; batch ``seq`` always lives in slot
``seq % len(slots)``, and a slot is refilled only after the consumer released the batch
it held (and, on CUDA, after the copy out of it ended).

Waking a sleeping thread costs tens of microseconds (more on a VM), as long as copying a
small batch. So threads work in *chunks* of consecutive batches (a few MiB): a filler
claims a chunk and copies all of it in one GIL-free kernel call, the consumer sleeps
until a whole chunk is ready, and fillers are woken when a whole chunk of slots is free.
The first chunk after a fresh start is the exception: it is claimed and handed out one
batch at a time, so the first batch is out after one batch's copy, not a chunk's.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from typing import Any

import numpy as np
import torch

from shardstore.errors import ShardstoreError
from shardstore.kernels import BatchBuffers, FileRows, SourceFault, SourceShrank, file_map_of
from shardstore.loader import pager
from shardstore.loader.jobs import Job
from shardstore.loader.slots import Slot
from shardstore.manifest.model import FieldSpec
from shardstore.sampling.plan import RankPlan
from shardstore.store.mmaps import shrunk_error

log = logging.getLogger(__name__)

_POLL_S = 0.1  # waits wake up this often, so KeyboardInterrupt reaches a waiting consumer


class LoaderRestarted(RuntimeError):
    """An iteration was overtaken by a newer one on the same loader."""


class Pipeline:
    """Filler threads, a pager thread and the slot ring; the consumer calls ``begin``/``take``/``finish``.

    ``planner(key)`` returns the ``RankPlan`` of job ``key``; a filler thread calls it when the
    job's turn to be planned comes (the next epoch's while this one drains). Every job reads
    its shards through its plan's store.
    """

    def __init__(self, fields: dict[str, FieldSpec], planner: Callable[[Hashable], RankPlan], slots: list[Slot],
                 chunk: int, *, num_threads: int, device: torch.device | None, read_ahead_shards: int,
                 drop_pages: bool, pread: bool = False) -> None:
        if len(slots) % chunk:
            raise ValueError(f"{len(slots)} slots are not a whole number of chunks of {chunk}")
        self.planner = planner
        self.slots = slots
        self.chunk = chunk
        self.buffers = BatchBuffers([slot.arrays for slot in slots],
                                    {name: (spec.dtype, spec.shape) for name, spec in fields.items()},
                                    slots[0].capacity)
        self.num_threads = num_threads
        self.device = device
        self.read_ahead_shards = read_ahead_shards
        self.drop_pages = drop_pages
        self.pread = pread
        self._stream = torch.cuda.Stream(device) if device is not None else None
        # One lock, three conditions: each kind of thread is woken only by what it waits for.
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # fillers: a chunk of slots was freed, a job added
        self._ready = threading.Condition(self._lock)  # consumer: a chunk was filled, a job planned
        self._page = threading.Condition(self._lock)  # pager: the fillers reached a new shard, or finished some
        self._threads: list[threading.Thread] = []
        self._generation = 0
        #: iterations that found their job already in preparation (the next epoch prepared ahead)
        self.warm_starts = 0
        self._reset()

    # -- state ------------------------------------------------------------------------------

    def _reset(self) -> None:
        self._jobs: deque[Job] = deque()
        self._retired: list[Job] = []
        self._claim_seq = 0  # first batch of the next chunk a filler takes
        self._ramp_end = self.chunk  # batches before this one are claimed and awaited one at a time
        self._released = 0  # batches before this one were handed out and given back
        self._planned_end = 0  # first seq after the last planned job
        self._stopping = False
        self._want: tuple[int, int] | None = None  # the consumer sleeps until this run of batches is filled
        for slot in self.slots:
            slot.seq, slot.error, slot.device_batch = -1, None, None

    @property
    def generation(self) -> int:
        """Bumped at every fresh start; an iteration holding an older one was overtaken."""
        return self._generation

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def stop(self, timeout: float | None = None) -> None:
        """Stop the threads: each ends after its current chunk, plan or read-ahead.

        With a ``timeout`` (the consumer was interrupted), wait at most that long; a thread
        still stuck in slow storage ends on its own, and the next start waits for it.
        """
        with self._lock:
            self._stopping = True
            for condition in (self._work, self._ready, self._page):
                condition.notify_all()
        me = threading.current_thread()
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            if t is not me:
                t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        self._threads = [t for t in self._threads if t.is_alive() and t is not me]

    def close(self) -> None:
        """Stop the threads and let go of every map the loader's epochs hold (``ShardLoader.close``)."""
        self.stop()
        with self._lock:
            jobs = [*self._jobs, *self._retired]
            self._jobs.clear()
            self._retired = []
        for job in jobs:
            if job.gather is not None:
                job.gather.release_all()

    def _start(self) -> None:
        names = [f"shardstore-fill-{i}" for i in range(self.num_threads)]
        targets: list[Callable[[], None]] = [self._fill_loop] * self.num_threads
        if self.read_ahead_shards or self.drop_pages:
            names.append("shardstore-pager")
            targets.append(self._pager_loop)
        # Every thread waits at a gate until all are started: Thread.start returns only once its thread
        # runs, which needs the GIL, and a filler already at work would hold that (5-10 ms per start
        # measured on the 2-core VMs, while the first batch was ready after 3).
        gate = threading.Event()
        self._threads = [threading.Thread(target=_after, args=(gate, t), name=n, daemon=True)
                         for t, n in zip(targets, names)]
        for t in self._threads:
            t.start()
        gate.set()

    # -- consumer side ----------------------------------------------------------------------

    def begin(self, key: Hashable, following: Hashable | None) -> tuple[Job, int]:
        """The job for ``key``: the one already in preparation when it is next in line, else a fresh start.

        ``following`` names the job expected after this one (None: none); it is planned at once
        and its first batches are gathered while this one drains.
        """
        with self._lock:
            head = self._jobs[0] if self._jobs else None
            reuse = (self.running and not self._stopping and head is not None and head.key == key
                     and not head.started)
            if reuse:
                if len(self._jobs) == 1 and following is not None:
                    self._jobs.append(Job(following, self.pread))
                    self._work.notify_all()
                self.warm_starts += 1
                return head, self._generation
        self.stop()
        self._reset()
        self._generation += 1
        self._jobs.append(Job(key, self.pread))
        if following is not None:
            self._jobs.append(Job(following, self.pread))
        self._start()
        return self._jobs[0], self._generation

    def _wait(self, ready: Callable[[], bool], generation: int) -> None:
        while generation != self._generation or not ready():
            if generation != self._generation:
                raise LoaderRestarted("this iteration was overtaken by a newer one on the same loader; "
                                      "iterate a loader from one place at a time")
            if self._stopping or not self.running:
                raise ShardstoreError("the loader's threads stopped (the loader was closed)")
            self._ready.wait(_POLL_S)

    def num_batches(self, job: Job, generation: int) -> int:
        """Batches in ``job``, once a thread planned it; raises what planning raised."""
        with self._lock:
            self._wait(lambda: job.planned, generation)
        if job.error is not None:
            raise job.error
        return job.num_batches

    def _aligned(self, seq: int) -> int:
        return -(-seq // self.chunk) * self.chunk

    def _claimable(self, seq: int) -> bool:
        """Every slot of the chunk starting at ``seq`` is free (lock held)."""
        return self._aligned(seq) + self.chunk <= self._released + len(self.slots)

    def _release(self, upto: int) -> None:
        """Batches before ``upto`` are given back (lock held); fillers are woken for a whole free chunk."""
        if upto <= self._released:
            return
        crossed_chunk = upto // self.chunk != self._released // self.chunk
        self._released = upto
        if self._claimable(self._claim_seq):
            self._work.notify_all()
        if crossed_chunk:
            if self.drop_pages:
                self._page.notify()  # shards the consumer is done with may be dropped (then unmapped) now
            else:
                self._unmap_finished()

    def _unmap_finished(self) -> None:
        """Let go of the maps of shards that no batch still to be filled reads (lock held).

        Every batch before ``_released`` was filled, so no filler reads those shards again.
        """
        for job in self._jobs:
            done = self._released - job.first_seq
            if not job.planned or job.error is not None or done <= 0:
                break
            job.unmap_finished(done)

    def _run_ready(self, seq: int, count: int) -> bool:
        """Batches ``seq .. seq + count - 1`` are all filled (lock held)."""
        n = len(self.slots)
        return all(self.slots[(seq + i) % n].seq == seq + i for i in range(count))

    def take(self, job: Job, batch: int, generation: int) -> dict[str, torch.Tensor]:
        """Batch ``batch`` of ``job``, waiting until it is filled; releases the batch before it."""
        seq = job.first_seq + batch
        slot = self.slots[seq % len(self.slots)]
        job.started = True
        with self._lock:
            self._wait(lambda: True, generation)
            self._release(seq)  # the consumer is done with the previous batch (on the CPU it viewed a slot)
            if slot.seq != seq:
                # Sleep until the rest of this batch's chunk is filled too: one wake-up per chunk (in the
                # first chunk of a fresh start, until this batch is).
                chunk_end = min(seq + 1 if seq < self._ramp_end else (seq // self.chunk + 1) * self.chunk,
                                job.first_seq + job.num_batches)
                self._want = (seq, chunk_end - seq)
                try:
                    self._wait(lambda: self._run_ready(seq, chunk_end - seq), generation)
                finally:
                    self._want = None
        if slot.error is not None:
            raise slot.error
        if slot.device_batch is None:
            return slot.batch()
        on_device, slot.device_batch = slot.device_batch, None
        current = torch.cuda.current_stream(self.device)
        current.wait_event(slot.copied)  # ready on the consumer's stream, without blocking the host
        for t in on_device.values():
            t.record_stream(current)  # the allocator keeps it until the consumer's work on it is done
        with self._lock:  # the pinned slot may be refilled once its copy ended (fillers wait on the event)
            self._release(seq + 1)
        return on_device

    def finish(self, job: Job) -> None:
        """The consumer took every batch of ``job``."""
        with self._lock:
            self._release(job.first_seq + job.num_batches)
            if self._jobs and self._jobs[0] is job:
                self._jobs.popleft()
                if self.drop_pages:
                    self._retired.append(job)
                    self._page.notify()
                else:
                    job.unmap(np.arange(job.visited.size))

    # -- filler threads ---------------------------------------------------------------------

    def _claim(self) -> tuple[str, Job, int, int] | None:
        """Next work (lock held): ``("plan", job, 0, 0)`` or ``("fill", job, first_seq, count)``."""
        for job in self._jobs:  # planned in order: every job before the first unplanned one is planned
            if not job.planned:
                if job.planning:
                    return None
                job.planning = True
                # Chunks never straddle two jobs: a job starts on a chunk boundary.
                job.first_seq = self._aligned(self._planned_end)
                return "plan", job, 0, 0
            if job.error is not None:
                return None
            end = job.first_seq + job.num_batches
            seq = max(self._claim_seq, job.first_seq)
            if seq >= end:
                continue
            if not self._claimable(seq):
                continue  # no free chunk of slots yet; a later job may still need planning
            count = 1 if seq < self._ramp_end else min(self.chunk - seq % self.chunk, end - seq)
            self._claim_seq = seq + count
            needed = job.shards_needed_by(seq + count - 1 - job.first_seq)
            if self.read_ahead_shards and (needed > job.claimed_shards or seq + count == end):
                job.claimed_shards = max(job.claimed_shards, needed)
                self._page.notify()  # the read-ahead window moved (at the job's end: into the next epoch)
            return "fill", job, seq, count
        return None

    def _await(self, find: Callable[[], Any], condition: threading.Condition) -> Any:
        """Under the lock: the next work ``find`` returns, sleeping on ``condition``; None once stopping."""
        while not self._stopping:
            work = find()
            if work is not None:
                return work
            condition.wait()
        return None

    def _fill_loop(self) -> None:
        if self.device is not None:
            torch.cuda.set_device(self.device)
        while True:
            with self._lock:
                work = self._await(self._claim, self._work)
            if work is None:
                return
            kind, job, seq, count = work
            if kind == "plan":
                self._plan(job)
            else:
                self._fill(job, seq, count)

    def _plan(self, job: Job) -> None:
        try:
            job.plan(self.planner(job.key))
        except BaseException as exc:  # raised in the consumer if it ever asks for this job
            job.error, job.num_batches = exc, 0
        with self._lock:
            job.planned, job.planning = True, False
            self._planned_end = job.first_seq + job.num_batches
            for condition in (self._work, self._ready, self._page):
                condition.notify_all()

    def _fill(self, job: Job, seq: int, count: int) -> None:
        """Gather batches ``seq .. seq + count - 1`` (one chunk) into their slots, then copy them to the device."""
        n = len(self.slots)
        first_slot = seq % n
        slots = self.slots[first_slot : first_slot + count]
        batch = seq - job.first_seq
        errors: list[BaseException | None] = [None] * count
        for slot in slots:
            if slot.copied is not None:
                slot.copied.synchronize()  # the previous batch's copy out of this slot has ended
        try:
            start, stop = job.batch_bounds(batch, count)
            job.gather.gather(job.source_index[start:stop], job.rows[start:stop], self.buffers, first_slot)
        except Exception:
            # Find the batch that fails, so the consumer gets every batch before it.
            for k in range(count):
                try:
                    start, stop = job.batch_bounds(batch + k)
                    job.gather.gather(job.source_index[start:stop], job.rows[start:stop], self.buffers, first_slot + k)
                except Exception as exc:
                    errors[k:] = [_loader_error(exc, job, batch + k)] * (count - k)
                    break
        for k, slot in enumerate(slots):
            start, stop = job.batch_bounds(batch + k)
            slot.size = stop - start
            if self._stream is not None and errors[k] is None:
                with torch.cuda.stream(self._stream):
                    # On a side stream: this copy overlaps the consumer's compute.
                    slot.device_batch = {name: t[: slot.size].to(self.device, non_blocking=True)
                                         for name, t in slot.host.items()}
                    slot.copied.record(self._stream)
        with self._lock:
            for k, slot in enumerate(slots):
                slot.error, slot.seq = errors[k], seq + k
            if self._want is not None and self._run_ready(*self._want):
                self._ready.notify()

    # -- pager thread -----------------------------------------------------------------------

    def _pager_work(self) -> tuple[str, Job, np.ndarray] | None:
        while self._retired:  # first: finished epochs hold maps and pages
            retired = self._retired.pop()
            finished = retired.take_finished()
            if finished.size:
                return "drop", retired, finished
        budget = self.read_ahead_shards  # shards ahead of the fillers, counted across jobs
        for job in self._jobs:
            if not job.planned or job.error is not None:
                break
            reached = self._claim_seq - job.first_seq
            needed = job.shards_needed_by(reached - 1) if reached > 0 else 0
            target = min(job.visited.size, needed + budget)
            if job.advised < target:
                todo = np.arange(job.advised, target)
                job.advised = target
                return "ahead", job, todo
            if self.drop_pages:
                finished = job.take_finished(self._released - job.first_seq)
                if finished.size:
                    return "drop", job, finished
            budget = max(0, budget - (job.visited.size - needed))
            if reached < job.num_batches:
                # The next epoch is read ahead only once this one's batches are all claimed: until then
                # its pages would only compete with this epoch's copies, and a process that ends with this
                # epoch (a fresh process per epoch) would never read them.
                break
        return None

    def _pager_loop(self) -> None:
        while True:
            with self._lock:
                work = self._await(self._pager_work, self._page)
                if work is None:
                    return
                kind, job, which = work
                # Shards another planned epoch reads (soon) keep their pages. By shard id: that epoch
                # may have been planned on a newer store, whose positions differ.
                in_use = {int(i) for j in self._jobs if j is not job and j.planned and j.store is not None
                          for i in j.store.shard_ids[j.visited]}
                claimed = self._claim_seq - job.first_seq
                reached = job.shards_needed_by(claimed - 1) if kind == "ahead" and claimed > 0 else 0
            store = job.store
            arrays, paths = [], []
            for j in which.tolist():
                position = int(job.visited[j])
                if kind == "drop" and int(store.shard_ids[position]) in in_use:
                    continue  # the next epoch reads it again soon
                if kind == "ahead" and job.unmapped[j]:
                    continue  # the fillers are past it already
                if j < reached:
                    # The fillers are in it already (the first shard of an epoch, usually): populating it
                    # as well would map the same pages twice over, competing for the same CPU. It is only
                    # advised, so that a cold file is read ahead in full.
                    paths.extend(store.path(position, name) for name in store.fields)
                    continue
                for name in store.fields:
                    try:
                        if kind == "ahead" and name not in job.gather.file_fields:
                            arr = job.gather.open(name, j)  # mapped now, its pages populated below
                        else:  # files read with pread are only advised (they are opened when read)
                            arr = job.gather.source(name, j)
                    except Exception:  # the filler that needs this shard reports the error, with its name
                        log.debug("read-ahead of shard %d failed", position, exc_info=True)
                        continue
                    if isinstance(arr, np.ndarray):
                        arrays.append(arr)
                    paths.append(store.path(position, name))
            if kind == "ahead":
                pager.read_ahead(arrays, paths)
            else:
                pager.drop_pages(arrays, paths)
                with self._lock:
                    job.unmap(which)  # after their pages were dropped: they unmap with the store's cache


def _after(gate: threading.Event, work: Callable[[], None]) -> None:
    gate.wait()
    work()


def _opened_bytes(job: Job, field: str, j: int) -> int:
    """Size of the file behind visited shard ``j``'s ``field`` when it was opened (maps span whole files)."""
    arr = job.gather.source(field, j)
    if isinstance(arr, FileRows):
        return arr.file_bytes
    mapping = file_map_of(arr) if arr is not None else None
    if mapping is not None:
        return len(mapping)
    dtype, shape = job.gather.fields[field]  # unmapped since: the data's bytes, without the header
    return int(job.gather.num_rows[j]) * dtype.itemsize * int(np.prod(shape, dtype=np.int64))


def _loader_error(exc: Exception, job: Job, batch: int) -> ShardstoreError:
    """A filler's error as the consumer sees it: shard errors as they are (they name the file)."""
    if isinstance(exc, ShardstoreError):
        return exc
    if isinstance(exc, (SourceFault, SourceShrank)):  # SIGBUS caught, or a short read: the file shrank
        position = int(job.visited[exc.source])
        error = shrunk_error(job.store.path(position, exc.field), _opened_bytes(job, exc.field, exc.source),
                             mapped=isinstance(exc, SourceFault))
        error.__cause__ = exc
        return error
    error = ShardstoreError(f"loading batch {batch} of {job.key}: {type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error
