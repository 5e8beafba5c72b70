"""How long the consumer waited for data: per batch of the latest epoch, and in total."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


class WaitStats:
    """Wait times of a loader's consumer, in seconds.

    A wait is the time ``next(iterator)`` spent blocked until its batch was ready; a trainer
    logs ``epoch_wait_s / epoch time`` as the share of time spent waiting for data.
    """

    def __init__(self, remote_clock: Callable[[], float] | None = None) -> None:
        self._remote_clock = remote_clock  # seconds the readers have spent waiting for object-store downloads
        self._remote_seen = remote_clock() if remote_clock is not None else 0.0
        self.remote_s = 0.0
        """Of ``total_s``, the part the readers waited for shards from object storage (0 for a local cache)."""
        self.total_s = 0.0
        """Summed over every batch this loader handed out."""
        self.batches = 0
        """Batches handed out over the loader's life."""
        self.last_s = 0.0
        """The wait for the latest batch."""
        self._epoch = np.zeros(0)
        self._epoch_batches = 0

    def start_epoch(self, num_batches: int) -> None:
        """A new iteration begins: per-batch waits restart (one array per epoch, none per batch)."""
        if self._epoch.size < num_batches:
            self._epoch = np.zeros(num_batches)
        self._epoch_batches = 0

    @property
    def local_s(self) -> float:
        """Of ``total_s``, the part not spent waiting for object storage: the local disk, the copies, the threads."""
        return self.total_s - self.remote_s

    def record(self, wait_s: float) -> None:
        if self._remote_clock is not None:
            # The readers' download waits since the last batch, capped by this wait: they overlapped it.
            now = self._remote_clock()
            self.remote_s += min(wait_s, max(0.0, now - self._remote_seen))
            self._remote_seen = now
        self.total_s += wait_s
        self.batches += 1
        self.last_s = wait_s
        if self._epoch_batches < self._epoch.size:
            self._epoch[self._epoch_batches] = wait_s
        self._epoch_batches += 1

    @property
    def per_batch_s(self) -> np.ndarray:
        """Waits of the batches handed out so far in the latest iteration, in order (a copy)."""
        return self._epoch[: self._epoch_batches].copy()

    @property
    def epoch_s(self) -> float:
        """Summed wait of the latest iteration so far."""
        return float(self._epoch[: self._epoch_batches].sum())

    def as_dict(self) -> dict[str, float]:
        """Scalars for a trainer's log line."""
        return {"wait_s_total": self.total_s, "wait_s_epoch": self.epoch_s, "wait_s_last": self.last_s,
                "wait_s_remote": self.remote_s, "wait_s_local": self.local_s, "batches": float(self.batches)}

    def __repr__(self) -> str:
        return f"WaitStats(total_s={self.total_s:.4f}, batches={self.batches}, epoch_s={self.epoch_s:.4f})"
