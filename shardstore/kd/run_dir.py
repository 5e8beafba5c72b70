"""Checks made before a run starts: a run directory that can hold checkpoints, and a seed torch can use.

Each is a one-line ``ConfigError`` naming the value and the fix, instead of a traceback from
deep inside ``mkdir`` or ``torch.manual_seed`` minutes into building the models.
"""

from __future__ import annotations

import os
from pathlib import Path

from shardstore.errors import ConfigError
from shardstore.store.atomic import disk_full_error, is_disk_full

# Kernel file systems: files there are interfaces to the kernel, not storage.
PSEUDO_FILE_SYSTEMS = (Path("/proc"), Path("/sys"))
# torch.manual_seed takes a 64-bit unsigned integer.
MAX_SEED = 2**64 - 1


def check_seed(seed: int) -> None:
    """``train.seed`` must fit torch's generator (``torch.manual_seed`` overflows above 2**64 - 1)."""
    if not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"train_config: seed {seed} is out of range; use an integer from 0 to 2**64 - 1 "
                          f"({MAX_SEED}), e.g. 0")


def prepare_run_dir(run_dir: Path, *, create: bool) -> None:
    """Refuse a ``train.run_dir`` that cannot hold a run; with ``create``, make it and its checkpoints folder."""
    real = Path(os.path.realpath(run_dir))  # a symlink into /proc is /proc too
    for pseudo in PSEUDO_FILE_SYSTEMS:
        if real == pseudo or pseudo in real.parents:
            raise ConfigError(f"train.run_dir {run_dir} is under {pseudo}, a kernel file system, not storage; "
                              "choose a directory on disk, e.g. runs/kd")
    for path in (run_dir, *run_dir.parents):
        if os.path.lexists(path) and not path.is_dir():
            what = "is a file" if path == run_dir else f"is inside {path}, which is a file"
            raise ConfigError(f"train.run_dir {run_dir} {what}, not a directory; choose another train.run_dir "
                              "(or move the file away)")
    if not create:
        return
    try:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full_error(run_dir, None) from exc
        raise ConfigError(f"train.run_dir {run_dir} cannot be created ({exc.strerror or type(exc).__name__}); "
                          "choose a directory you can write to") from None
    if not os.access(run_dir / "checkpoints", os.W_OK | os.X_OK):
        raise ConfigError(f"train.run_dir {run_dir} is not writable; choose a directory you can write to")
