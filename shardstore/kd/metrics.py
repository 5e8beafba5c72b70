"""What a run logs: JSON lines in ``RUN_DIR/metrics.jsonl`` and, when tensorboard is installed, scalars."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from shardstore.store.atomic import disk_full_error, is_disk_full, write_bytes_atomic

log = logging.getLogger(__name__)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLog:
    """Appends one JSON object per line; ``kind`` is ``step`` or ``epoch``. Only rank 0 writes one."""

    def __init__(self, run_dir: Path, *, tensorboard: bool = False) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", buffering=1)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.info("tensorboard is not installed; metrics go to %s only", self.path)
            else:
                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    @staticmethod
    def truncate(run_dir: Path, global_step: int) -> None:
        """Keep only the lines up to ``global_step`` (resuming: the lines after the checkpoint are redone)."""
        path = Path(run_dir) / "metrics.jsonl"
        if not path.exists():
            return
        kept = [json.dumps(doc) for doc in read_metrics(run_dir) if doc.get("global_step", 0) <= global_step]
        write_bytes_atomic(path, ("\n".join(kept) + "\n" if kept else "").encode())

    def write(self, kind: str, values: dict[str, Any]) -> None:
        doc = {"kind": kind, **{k: _clean(v) for k, v in values.items()}}
        line = json.dumps(doc) + "\n"
        try:
            self._file.write(line)
        except OSError as exc:
            if is_disk_full(exc):
                raise disk_full_error(self.path, len(line.encode())) from exc
            raise
        if self._tb is not None:
            step = int(values.get("global_step", 0))
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "global_step":
                    self._tb.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Every complete line of a run's metrics.jsonl (a line cut by a crash is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


@dataclass
class EpochTally:
    """An epoch's running sums of the loss parts, with its batch and sample counts and seconds so far.

    It belongs in a mid-epoch checkpoint: a resumed epoch then reports (and picks ``best.pt``
    by) all its batches, not only those after the resume. The sums stay on the device while
    training; reading them is a host sync, done only where the loop already waits.
    """

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    batches: int = 0
    samples: int = 0
    seconds: float = 0.0  # spent in this epoch by the runs before the current one

    def add(self, parts: dict[str, torch.Tensor], samples: int) -> None:
        """Count one batch of ``samples`` with its loss parts (device tensors, not read here)."""
        for k, v in parts.items():
            self.sums[k] = self.sums[k] + v.detach() if k in self.sums else v.detach()
        self.batches += 1
        self.samples += samples

    def finite(self) -> bool:
        """Whether every batch so far had finite loss parts (a NaN or inf stays in the sum). Syncs."""
        if not self.sums:
            return True
        return bool(torch.isfinite(torch.stack([v.float() for v in self.sums.values()])).all())

    def means(self) -> dict[str, float]:
        """``train_<part>``: the mean of each loss part over the epoch's batches. Syncs."""
        return {f"train_{k}": float(v) / max(self.batches, 1) for k, v in self.sums.items()}

    def state_dict(self, seconds_now: float) -> dict[str, Any]:
        """Plain values and CPU tensors (loadable with ``weights_only=True``); ``seconds_now`` of this run."""
        return {"sums": {k: v.detach().to("cpu") for k, v in self.sums.items()}, "batches": self.batches,
                "samples": self.samples, "seconds": self.seconds + seconds_now}

    @classmethod
    def from_state(cls, state: dict[str, Any] | None, device: torch.device) -> EpochTally:
        """The tally a checkpoint saved (an empty one for a checkpoint without it)."""
        if not state:
            return cls()
        return cls({k: v.to(device) for k, v in state["sums"].items()}, int(state["batches"]),
                   int(state["samples"]), float(state["seconds"]))
