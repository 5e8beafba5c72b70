"""Two gloo processes under torchrun train in lockstep: the same steps, identical weights, one writer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import overrides


@pytest.mark.slow
def test_two_cpu_ranks_take_the_same_steps_and_end_identical(tiny_cache: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "ddp"
    sets = [a for o in overrides(run_dir, tiny_cache, train__epochs=2) for a in ("--set", o)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "shardstore", "train", "--device", "cpu", *sets]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((run_dir / f"final_rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 2 * 4  # 128 samples / (2 ranks x 16) per epoch
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    assert proc.stdout.count("resolved configuration:") == 1  # rank 0 alone prints and logs
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("epoch_*.pt")) == ["epoch_0000.pt", "epoch_0001.pt"]
