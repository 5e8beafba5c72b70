"""Progress as the commands show it: a rich bar on a terminal, plain lines where a bar draws nothing (a SLURM log).

A bar redraws one line in place; in a file it would be either nothing (rich's choice) or thousands of
lines. A line every ``every_s`` seconds inside an epoch says the job is alive and when the epoch ends:
``epoch 3/10 step 120/480 loss 1.2340 1,234 samples/s wait 3.0% eta 2m10s``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.text import Text

from shardstore.cli.app import err


def format_duration(seconds: float) -> str:
    """``45s``, ``2m10s``, ``1h05m``: a remaining time as a log line shows it."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class PlainProgress:
    """Writes a progress line at a logged step once ``every_s`` seconds passed since the epoch began or the last line.

    The trainer reports every ``train.log.every_steps``-th step; the line carries that step's loss, throughput and
    share of time spent waiting for data, and the time the epoch still needs at the pace measured so far.
    """

    def __init__(self, every_s: float, write: Callable[[str], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s = every_s
        self.write = write
        self.clock = clock
        self._epoch = self._epochs = self._steps = 0
        self._last_line = 0.0
        self._first: tuple[int, float] | None = None  # (step, time) of the epoch's first report

    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None:
        self._epoch, self._epochs, self._steps = epoch, epochs, steps
        self._last_line = self.clock()
        self._first = None

    def step(self, step: int, values: dict[str, float]) -> None:
        """Step ``step`` (1-based, within the epoch) was reported with ``values``; write a line if one is due."""
        if self.every_s <= 0:
            return
        now = self.clock()
        if self._first is None:
            self._first = (step, now)
        if now - self._last_line < self.every_s:
            return
        self._last_line = now
        self.write(self.line(step, values, now))

    def line(self, step: int, values: dict[str, float], now: float) -> str:
        parts = [f"epoch {self._epoch + 1}/{self._epochs} step {step}/{self._steps}"]
        if "loss" in values:
            parts.append(f"loss {values['loss']:.4f}")
        if "samples_per_s" in values:
            parts.append(f"{values['samples_per_s']:,.0f} samples/s")
        if "wait_frac" in values:
            parts.append(f"wait {100 * values['wait_frac']:.1f}%")
        if "download_MBps" in values:  # a cache in object storage
            parts.append(f"(remote {100 * values.get('remote_wait_frac', 0.0):.1f}%) download "
                         f"{values['download_MBps']:,.0f} MB/s local cache {values.get('local_cache_GB', 0.0):.2f}/"
                         f"{values.get('local_cache_limit_GB', 0.0):.2f} GB")
        eta = self._eta(step, now)
        if eta is not None:
            parts.append(f"eta {format_duration(eta)}")
        return " ".join(parts)

    def _eta(self, step: int, now: float) -> float | None:
        """Seconds left in the epoch at the pace since the epoch's first report; None before two reports.

        Measured from the first report, not from the epoch's start: a resumed epoch starts in the middle.
        """
        assert self._first is not None
        first_step, first_time = self._first
        if step <= first_step or now <= first_time:
            return None
        return max(0, self._steps - step) * (now - first_time) / (step - first_step)


def format_bytes(n: float) -> str:
    """``512 B``, ``1.23 MB``: decimal units, as `info` and `verify` print sizes."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1000
    return str(n)


class RateColumn(ProgressColumn):
    """Items per second, e.g. ``1,234 images/s``."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        return Text(f"{task.speed or 0:,.0f} {self.unit}/s")


class Advance:
    """``advance(n)`` for a library's progress callback; ``advance.set_total(n)`` when the total is known late."""

    def __init__(self, bar: Progress, task: Any) -> None:
        self.bar, self.task = bar, task

    def __call__(self, n: int) -> None:
        self.bar.advance(self.task, n)

    def set_total(self, total: int) -> None:
        self.bar.update(self.task, total=total)


@contextmanager
def progress_bar(description: str, total: int | None, *, bytes_: bool = False, rate: str | None = None,
              hidden: bool = False) -> Iterator[Advance]:
    """A rich progress bar on stderr; yields ``advance(n)``. Hidden when stderr is not a terminal (or ``hidden``)."""
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn() if not bytes_ else
               TransferSpeedColumn(), *([RateColumn(rate)] if rate else []), TimeRemainingColumn()]
    with Progress(*columns, console=err, transient=True, disable=hidden or not err.is_terminal) as bar:
        yield Advance(bar, bar.add_task(description, total=total))
