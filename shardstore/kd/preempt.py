"""Stopping a run cleanly when the cluster (or the user) asks: a signal sets a flag, the loop saves and stops.

A scheduler announces the end of a job with a signal: SLURM sends SIGTERM (or, with
``#SBATCH --signal=USR1@120``, SIGUSR1 two minutes early), torchrun forwards SIGTERM and SIGINT
to its workers, Ctrl-C is SIGINT. The handler only records which signal came: the training
loop finishes the step it is in, writes a recovery checkpoint through the atomic writers and
raises ``TrainingPreempted``; the CLI prints one line and exits with ``EXIT_PREEMPTED`` (75,
``EX_TEMPFAIL`` in ``sysexits.h``: "try again later"), the code a batch script requeues on.

A second SIGINT (Ctrl-C pressed again) raises ``KeyboardInterrupt`` at once, even in the middle
of the save: every checkpoint write is atomic, so the newest complete checkpoint stays as it was.
Any other signal repeated is ignored: the save it asked for is already under way.

Under torch.distributed every rank must stop at the same step (a rank that stops alone leaves
the others waiting in a collective), so the ranks agree with one small all-reduce at points the
loop already synchronises (logged steps and the end of an epoch) before any of them acts.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from shardstore.config.train import catchable_signal
from shardstore.kd import distributed

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75
"""Exit code of a run stopped by a signal after saving its recovery checkpoint (``EX_TEMPFAIL``): requeue it."""


@dataclass(frozen=True)
class StopPoint:
    """Where a run stands: the epoch (from 0), the batches it took of it, and what it trained so far."""

    epoch: int
    epochs: int
    step: int
    steps: int
    global_step: int
    samples: int
    epoch_complete: bool

    def describe(self) -> str:
        """``epoch 2/3 after step 5/12 (global step 17, 1,088 samples)``; epochs and steps counted from 1."""
        where = (f"after epoch {self.epoch + 1}/{self.epochs}" if self.epoch_complete else
                 f"in epoch {self.epoch + 1}/{self.epochs} after step {self.step}/{self.steps}")
        return f"{where} (global step {self.global_step:,}, {self.samples:,} samples)"


class TrainingPreempted(Exception):
    """A run stopped by ``signal_name`` at ``point``; ``checkpoint`` is where it continues from (None: no step yet)."""

    def __init__(self, signal_name: str, point: StopPoint, checkpoint: Path | None, *, saved: bool) -> None:
        self.signal_name, self.point, self.checkpoint, self.saved = signal_name, point, checkpoint, saved
        if checkpoint is None:
            what = "nothing to save yet"
        else:
            what = f"saved {checkpoint}" if saved else f"its latest checkpoint is {checkpoint}"
        super().__init__(f"stopped by {signal_name} {point.describe()}: {what}")


class PreemptionGuard:
    """While entered, ``signals`` set ``requested`` (the signal's name) instead of ending the process.

    Handlers can only be installed from the main thread; elsewhere the guard stays inert (the
    process keeps the handlers it has). The previous handlers come back on exit.
    """

    def __init__(self, signals: Iterable[str], *, notify: bool = True) -> None:
        self.signals = [catchable_signal(name) for name in signals]
        self.notify = notify
        self.requested: str | None = None
        self.aborted = False  # a second Ctrl-C came; torch.save reports it as a RuntimeError of its own
        self._previous: dict[signal.Signals, Any] = {}

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is not threading.main_thread():
            log.info("training outside the main thread: %s keep their handlers",
                     ", ".join(s.name for s in self.signals) or "no signals")
            return self
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None:
            if signum == signal.SIGINT:  # Ctrl-C twice: the user wants out now; atomic writes keep the files whole
                self.aborted = True
                raise KeyboardInterrupt
            return
        self.requested = name
        if self.notify:
            again = "; press Ctrl-C again to stop at once" if signum == signal.SIGINT else ""
            # os.write, not print: a handler may run while the main thread is inside a write to sys.stderr.
            os.write(2, f"shardstore: {name} received: saving a recovery checkpoint after the current step{again}\n"
                     .encode())


class RecoveryTrigger:
    """When the loop writes a recovery checkpoint inside an epoch, and when it stops.

    A checkpoint is due every ``every_steps`` optimizer steps and once ``every_minutes`` passed
    since the newest checkpoint (0 turns either off); a stop when a signal reached any rank. Under
    torch.distributed the ranks only decide where the loop can agree (``can_agree``): rank 0's
    clock and every rank's signal flag go into one all-reduce, so all ranks save and stop together.
    """

    def __init__(self, guard: PreemptionGuard, info: distributed.DistInfo, *, every_steps: int,
                 every_minutes: float) -> None:
        self.guard, self.info = guard, info
        self.every_steps, self.every_minutes = every_steps, every_minutes
        self.saved_step = 0  # the global step of the newest checkpoint
        self.saved_at = time.monotonic()

    @property
    def signal_name(self) -> str:
        return self.guard.requested or "a signal to another rank"

    def saved(self, global_step: int) -> None:
        """A checkpoint of ``global_step`` was just written (the clock of ``every_minutes`` starts again)."""
        self.saved_step, self.saved_at = global_step, time.monotonic()

    def is_new(self, global_step: int) -> bool:
        """Whether ``global_step`` is newer than the newest checkpoint (else there is nothing to save)."""
        return global_step != self.saved_step

    def at_step(self, global_step: int, *, can_agree: bool) -> tuple[bool, bool]:
        """``(stop, checkpoint_due)`` after optimizer step ``global_step`` (every rank calls it at every step)."""
        stop = due = False
        if can_agree or not self.info.distributed:
            clock = bool(self.every_minutes) and time.monotonic() - self.saved_at >= 60.0 * self.every_minutes
            stop, due = self._agree(self.guard.requested is not None, clock)
        due = due or bool(self.every_steps and global_step % self.every_steps == 0)
        return stop, due

    def stop_requested(self) -> bool:
        """Whether a stop signal reached any rank (a collective: every rank calls it at the same point)."""
        return self._agree(self.guard.requested is not None, False)[0]

    def _agree(self, stop: bool, due: bool) -> tuple[bool, bool]:
        """Whether any rank was asked to stop, and whether rank 0's clock finds a checkpoint due (one all-reduce)."""
        if not self.info.distributed:
            return stop, due
        device = self.info.device if self.info.device.type == "cuda" else torch.device("cpu")
        flags = torch.tensor([float(stop), float(due and self.info.is_main)], dtype=torch.float64, device=device)
        dist.all_reduce(flags)
        return bool(flags[0].item() > 0), bool(flags[1].item() > 0)
