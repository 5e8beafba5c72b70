"""The loader's engine: background threads fill a ring of reused batch slots, in order, ahead of the consumer.

Batches carry a running number (``seq``) across jobs, so the threads run straight from
the end of one epoch into the start of the next one; batch ``seq`` always lives in slot
``seq % len(slots)``, and a slot is refilled only after the consumer released the batch
it held (and, on CUDA, after the copy out of it finished).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Hashable

import numpy as np
import torch

from shardstore.errors import ShardstoreError
from shardstore.loader import pager
from shardstore.loader.jobs import Job
from shardstore.loader.slots import Slot
from shardstore.manifest.reader import ShardStore

log = logging.getLogger(__name__)

_POLL_S = 0.1  # waits wake up this often, so KeyboardInterrupt reaches a waiting consumer


class LoaderRestarted(RuntimeError):
    """An iteration was overtaken by a newer one on the same loader."""


class Pipeline:
    """Filler threads, a pager thread and the slot ring; the consumer calls ``begin``/``take``/``finish``."""

    def __init__(self, store: ShardStore, slots: list[Slot], *, num_threads: int, device: torch.device | None,
                 read_ahead_shards: int, drop_pages: bool) -> None:
        self.store = store
        self.slots = slots
        self.num_threads = num_threads
        self.device = device
        self.read_ahead_shards = read_ahead_shards
        self.drop_pages = drop_pages
        self._stream = torch.cuda.Stream(device) if device is not None else None
        # One lock, three conditions: each kind of thread is woken only by what it waits for.
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # fillers: a slot was released, a job added or planned
        self._ready = threading.Condition(self._lock)  # consumer: a batch was filled, a job planned
        self._page = threading.Condition(self._lock)  # pager: the fillers or the consumer moved on
        self._threads: list[threading.Thread] = []
        self._generation = 0
        #: iterations that found their job already in preparation (next epoch prepared ahead)
        self.warm_starts = 0
        self._reset()

    # -- state ------------------------------------------------------------------------------

    def _reset(self) -> None:
        self._jobs: deque[Job] = deque()
        self._retired: list[Job] = []
        self._claim_seq = 0  # next batch a filler takes
        self._released = 0  # batches before this one were handed out and given back
        self._planned_end = 0  # first seq after the last planned job
        self._stopping = False
        for slot in self.slots:
            slot.seq, slot.error, slot.device_batch = -1, None, None

    @staticmethod
    def _notify(*conditions: threading.Condition) -> None:
        for c in conditions:
            c.notify_all()

    @property
    def generation(self) -> int:
        """Bumped at every fresh start; an iteration holding an older one was overtaken."""
        return self._generation

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def stop(self) -> None:
        """Stop and join the threads (prompt: they only ever block for one batch's copy or one plan)."""
        with self._lock:
            self._stopping = True
            self._notify(self._work, self._ready, self._page)
        me = threading.current_thread()
        for t in self._threads:
            if t is not me:
                t.join()
        self._threads = []

    def _start(self) -> None:
        names = [f"shardstore-fill-{i}" for i in range(self.num_threads)]
        targets: list[Callable[[], None]] = [self._fill_loop] * self.num_threads
        if self.read_ahead_shards or self.drop_pages:
            names.append("shardstore-pager")
            targets.append(self._pager_loop)
        self._threads = [threading.Thread(target=t, name=n, daemon=True) for t, n in zip(targets, names)]
        for t in self._threads:
            t.start()

    # -- consumer side ----------------------------------------------------------------------

    def begin(self, key: Hashable, plan: Callable[[], np.ndarray], batch_size: int, drop_last: bool,
              following: tuple[Hashable, Callable[[], np.ndarray]] | None) -> tuple[Job, int]:
        """The job for ``key``: the one already being prepared when it is next in line, else a fresh start.

        ``following`` names the job expected after this one; its first batches are
        prepared while this one drains.
        """
        with self._lock:
            head = self._jobs[0] if self._jobs else None
            reuse = (self.running and not self._stopping and head is not None and head.key == key
                     and (not head.planned or head.first_seq == self._released))
            if reuse:
                if len(self._jobs) == 1 and following is not None:
                    self._jobs.append(Job(following[0], following[1], batch_size, drop_last))
                    self._notify(self._work)
                self.warm_starts += 1
                return head, self._generation
        self.stop()
        self._reset()
        self._generation += 1
        self._jobs.append(Job(key, plan, batch_size, drop_last))
        if following is not None:
            self._jobs.append(Job(following[0], following[1], batch_size, drop_last))
        self._start()
        return self._jobs[0], self._generation

    def _wait(self, ready: Callable[[], bool], generation: int) -> None:
        while not ready():
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

    def take(self, job: Job, batch: int, generation: int) -> dict[str, torch.Tensor]:
        """Batch ``batch`` of ``job``, waiting until a thread filled it; releases the one before it."""
        seq = job.first_seq + batch
        slot = self.slots[seq % len(self.slots)]
        with self._lock:
            if seq > self._released:  # the consumer is done with the previous batch (CPU: it viewed a slot)
                self._released = seq
                self._notify(self._work, self._page)
            self._wait(lambda: slot.seq == seq, generation)
        if slot.error is not None:
            raise slot.error
        if slot.device_batch is None:
            return slot.batch()
        batch_on_device, slot.device_batch = slot.device_batch, None
        current = torch.cuda.current_stream(self.device)
        current.wait_event(slot.copied)  # ready on the consumer's stream, without blocking the host
        for t in batch_on_device.values():
            t.record_stream(current)  # the allocator keeps it until the consumer's work on it is done
        with self._lock:  # the pinned slot may be refilled once its copy ended (fillers wait on the event)
            self._released = seq + 1
            self._notify(self._work, self._page)
        return batch_on_device

    def finish(self, job: Job) -> None:
        """The consumer took every batch of ``job``."""
        with self._lock:
            self._released = max(self._released, job.first_seq + job.num_batches)
            if self._jobs and self._jobs[0] is job:
                self._jobs.popleft()
                if self.drop_pages:
                    self._retired.append(job)
            self._notify(self._work, self._page)

    # -- filler threads ---------------------------------------------------------------------

    def _claim(self) -> tuple[str, Job, int] | None:
        """Next piece of work: ``("plan", job, 0)`` or ``("fill", job, seq)``; None when there is none yet."""
        seq = self._claim_seq
        for job in self._jobs:
            if not job.planned:
                if job.planning:
                    return None
                job.planning = True
                job.first_seq = self._planned_end
                return "plan", job, 0
            if job.error is not None:
                return None
            if seq < job.first_seq + job.num_batches:
                if seq >= self._released + len(self.slots):
                    return None  # every slot is full or held by the consumer
                self._claim_seq += 1
                self._page.notify()
                return "fill", job, seq
        return None

    def _fill_loop(self) -> None:
        if self.device is not None:
            torch.cuda.set_device(self.device)
        while True:
            with self._lock:
                while (work := None if self._stopping else self._claim()) is None:
                    if self._stopping:
                        return
                    self._work.wait()
            kind, job, seq = work
            if kind == "plan":
                self._plan(job)
            else:
                self._fill(job, seq)

    def _plan(self, job: Job) -> None:
        try:
            job.plan(self.store)
        except BaseException as exc:  # raised in the consumer if it ever asks for this job
            job.error, job.num_batches = exc, 0
        with self._lock:
            job.planned, job.planning = True, False
            self._planned_end = job.first_seq + job.num_batches
            self._notify(self._work, self._ready, self._page)

    def _fill(self, job: Job, seq: int) -> None:
        slot = self.slots[seq % len(self.slots)]
        batch = seq - job.first_seq
        start, stop = job.batch_bounds(batch)
        error: BaseException | None = None
        try:
            if slot.copied is not None:
                slot.copied.synchronize()  # the previous batch's copy out of this slot has ended
            for name, gather in job.gathers.items():
                gather.gather(job.source_index[start:stop], job.rows[start:stop], slot.arrays[name][: stop - start])
            if self._stream is not None:
                with torch.cuda.stream(self._stream):
                    # Off the consumer's stream: this copy overlaps its compute.
                    slot.device_batch = {k: t[: stop - start].to(self.device, non_blocking=True)
                                         for k, t in slot.host.items()}
                    slot.copied.record(self._stream)
        except ShardstoreError as exc:
            error = exc
        except Exception as exc:
            error = ShardstoreError(f"loading batch {batch} of {job.key}: {type(exc).__name__}: {exc}")
            error.__cause__ = exc
        with self._lock:
            slot.size, slot.error, slot.seq = stop - start, error, seq
            self._ready.notify()

    # -- pager thread -----------------------------------------------------------------------

    def _pager_work(self) -> tuple[str, Job, np.ndarray] | None:
        for job in self._jobs:
            if not job.planned or job.error is not None:
                continue
            reached = max(self._claim_seq - job.first_seq, 0)
            target = min(job.visited.size, job.shards_needed_by(reached) + self.read_ahead_shards)
            if self.read_ahead_shards and job.advised < target:
                todo = np.arange(job.advised, target)
                job.advised = target
                return "ahead", job, todo
            if self.drop_pages:
                finished = job.take_finished(self._released - job.first_seq)
                if finished.size:
                    return "drop", job, finished
        while self._retired:
            retired = self._retired.pop()
            finished = retired.take_finished()
            if finished.size:
                return "drop", retired, finished
        return None

    def _pager_loop(self) -> None:
        while True:
            with self._lock:
                while (work := None if self._stopping else self._pager_work()) is None:
                    if self._stopping:
                        return
                    self._page.wait()
                in_use = {int(p) for j in self._jobs if j.planned for p in j.visited[: j.advised]}
            kind, job, which = work
            arrays, paths = [], []
            for j in which:
                if kind == "drop" and int(job.visited[j]) in in_use:
                    continue  # the next epoch reads it again soon
                for name, gather in job.gathers.items():
                    try:
                        arr = gather.open(int(j)) if kind == "ahead" else gather.source(int(j))
                    except Exception:  # the filler that needs this shard reports the error, with its name
                        log.debug("read-ahead of shard %d failed", int(job.visited[j]), exc_info=True)
                        continue
                    if arr is not None:
                        arrays.append(arr)
                    paths.append(self.store.path(int(job.visited[j]), name))
            if kind == "ahead":
                pager.read_ahead(arrays, paths)
            else:
                pager.drop_pages(arrays, paths)
