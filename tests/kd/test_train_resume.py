"""A run killed with SIGKILL between checkpoints and resumed ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from shardstore.config.resolve import DEFAULT_DATA_CONFIG, DEFAULT_MODEL_CONFIG, DEFAULT_TRAIN_CONFIG, load_run_config
from shardstore.kd.metrics import read_metrics
from shardstore.kd.trainer import train

from .conftest import overrides

CONFIGS = [DEFAULT_DATA_CONFIG, DEFAULT_TRAIN_CONFIG, DEFAULT_MODEL_CONFIG]

KILLER = """
import os, signal, sys
from shardstore.config.resolve import load_run_config
from shardstore.kd.trainer import train

class KillAt:
    def epoch_start(self, *a): pass
    def epoch_end(self, *a): pass
    def step(self, epoch, step, values):
        if values and self.n == {kill_at}:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no atexit: like a node failure
        self.n += 1
    n = 1

cfg = load_run_config(*{configs!r}, {overrides!r})
train(cfg, reporter=KillAt())
"""


def step_losses(run_dir: Path) -> list[tuple[int, float, float, float]]:
    return [(r["global_step"], r["loss"], r["kd"], r["lr"]) for r in read_metrics(run_dir) if r["kind"] == "step"]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [{}, {"train__accumulation_steps": 2, "train__ema_decay": 0.9}])
def test_killed_and_resumed_run_matches_an_uninterrupted_one(tiny_cache: Path, tmp_path: Path, extra: dict) -> None:
    common = {"train__checkpoint__every_steps": 2, **extra}
    whole = train(load_run_config(*CONFIGS, overrides(tmp_path / "whole", tiny_cache, **common)))

    run_dir = tmp_path / "killed"
    script = KILLER.format(kill_at=7, configs=[str(c) for c in CONFIGS],
                           overrides=overrides(run_dir, tiny_cache, **common))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    latest = json.loads((run_dir / "checkpoints" / "latest.json").read_text())
    assert latest["path"] == "recovery.pt"  # killed inside an epoch, after a recovery checkpoint
    assert 0 < latest["global_step"] < whole.global_step

    resumed = train(load_run_config(*CONFIGS, overrides(run_dir, tiny_cache, **common)), resume=True)
    assert resumed.global_step == whole.global_step
    assert resumed.weights_sha256 == whole.weights_sha256  # bit-identical student
    assert step_losses(run_dir) == step_losses(tmp_path / "whole")  # the same logged losses, none twice
    epochs = [r for r in read_metrics(run_dir) if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [0, 1, 2]
    assert (run_dir / "checkpoints" / "best.pt").exists() and not (run_dir / "checkpoints" / "recovery.pt").exists()


def test_resume_without_a_checkpoint_is_refused_auto_starts_fresh_and_a_bad_file_is_named(
        tiny_cache: Path, tmp_path: Path) -> None:
    from shardstore import ConfigError

    cfg = load_run_config(*CONFIGS, overrides(tmp_path / "run", tiny_cache, train__epochs=1))
    # A mistyped run_dir must not train from scratch: --resume names the folder it found empty.
    with pytest.raises(ConfigError, match=r"^--resume: train.run_dir .*/run holds no checkpoint \(.*/run/checkpoints/"
                                          r"latest.json does not exist\); check train.run_dir"):
        train(cfg, resume=True)
    assert not (tmp_path / "run").exists()
    assert train(cfg, resume="auto").epochs_done == 1  # what a requeued batch job runs every time
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="bad.pt: is not a readable torch.save file .*resume from another file"):
        train(cfg, resume=bad)
