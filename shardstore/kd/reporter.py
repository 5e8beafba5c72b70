"""What a training run tells its front end while it runs, and what it returns: progress calls and the result."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch


class Reporter(Protocol):
    """What a front end shows while training (the CLI draws a rich progress bar); every method is optional work.

    A reporter may also have ``note(line)``: a one-line message (where a resume continues, the settings it
    changed); the trainer calls it when present.
    """

    def epoch_start(self, epoch: int, epochs: int, shards: list[int], steps: int) -> None: ...
    def step(self, epoch: int, step: int, values: dict[str, float]) -> None: ...
    def epoch_end(self, epoch: int, values: dict[str, Any]) -> None: ...


class SilentReporter:
    """Shows nothing."""

    def epoch_start(self, epoch: int, epochs: int, shards: list[int], steps: int) -> None:
        pass

    def step(self, epoch: int, step: int, values: dict[str, float]) -> None:
        pass

    def epoch_end(self, epoch: int, values: dict[str, Any]) -> None:
        pass


@dataclass
class TrainResult:
    """A finished run: where it wrote, how far it went, its last evaluation and a digest of the final weights."""

    run_dir: Path
    global_step: int
    epochs_done: int
    last_eval: dict[str, float] = field(default_factory=dict)
    weights_sha256: str = ""


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 of a module's parameters and buffers, in state-dict order (equal weights, equal digest)."""
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
