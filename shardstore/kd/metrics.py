"""What a run logs: JSON lines in ``RUN_DIR/metrics.jsonl`` and, when tensorboard is installed, scalars."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from shardstore.store.atomic import write_bytes_atomic

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
        self._file.write(json.dumps(doc) + "\n")
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
