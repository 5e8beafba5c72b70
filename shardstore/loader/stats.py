"""How long the consumer waited for data: per batch of the latest epoch, and in total."""

from __future__ import annotations

import numpy as np


class WaitStats:
    """Wait times of a loader's consumer, in seconds.

    A wait is the time ``next(iterator)`` spent blocked until its batch was ready; a trainer
    logs ``epoch_wait_s / epoch time`` as the share of time spent waiting for data.
    """

    def __init__(self) -> None:
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

    def record(self, wait_s: float) -> None:
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
                "batches": float(self.batches)}

    def __repr__(self) -> str:
        return f"WaitStats(total_s={self.total_s:.4f}, batches={self.batches}, epoch_s={self.epoch_s:.4f})"
