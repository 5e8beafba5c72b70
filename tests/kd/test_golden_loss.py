"""Golden loss curve: the first 20 logged steps of a tiny deterministic CPU run against stored values.

The run is the kd tests' tiny cache and settings (a width-4 ``cnn_small`` student distilled from a seeded,
untrained width-8 teacher; 16 images per step, 8 steps per epoch, one torch thread) with the settings that
shape the curve pinned here. Each logged step's ``loss`` and ``lr`` are compared with ``golden_loss.json``
beside this file. A change to the loss (its terms, weights or temperature), to the learning-rate schedule, to
the data order (the shards an epoch takes, their order, the samples within them), to initialisation or to
augmentation moves these numbers and fails the test: that is what it is for. When the change is intended,
regenerate the file and commit it with the change:

    SHARDSTORE_REGENERATE_GOLDEN=1 python -m pytest tests/kd/test_golden_loss.py

On one machine the run repeats bit for bit, in fresh processes and after other tests. The tolerance (relative
1e-4, absolute 1e-5) leaves room for the summation order of other CPUs and torch builds. The smallest change
tried, temperature 2.0 -> 2.5, leaves it at step 2 (KD at near-uniform logits hardly depends on the temperature)
and moves later steps by up to 1e-3 relative; one more warmup step, another ``random_subset_seed`` or
``train.seed`` move the first step's lr or loss by 1% to 6%.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from shardstore.config.resolve import DEFAULT_DATA_CONFIG, DEFAULT_MODEL_CONFIG, DEFAULT_TRAIN_CONFIG, load_run_config
from shardstore.kd.metrics import read_metrics
from shardstore.kd.trainer import train

from .conftest import overrides, write_tiny_cache

GOLDEN = Path(__file__).with_name("golden_loss.json")
REGENERATE = "SHARDSTORE_REGENERATE_GOLDEN"
STEPS = 20
RTOL, ATOL = 1e-4, 1e-5

#: what shapes the curve, pinned so that edits to the shared tiny settings do not move it
RUN: dict[str, Any] = {
    "train__seed": 0, "train__epochs": 3, "train__batch_size": 16, "train__base_batch_size": 16,
    "train__max_steps_per_epoch": None, "train__lr": 0.01, "train__warmup_steps": 2, "train__threads": 1,
    "train__log__every_steps": 1, "train__eval__held_out_shards": 2,
    "data__random_subset_seed": 42, "data__shards_per_epoch": 4, "data__loader_threads": 1,
    "model__teacher__name": "cnn_small", "model__teacher__kwargs": {"width": 8}, "model__teacher__checkpoint": None,
    "model__student__name": "cnn_small", "model__student__kwargs": {"width": 4},
}


def run_curve(tmp_path: Path, **changes: Any) -> list[dict[str, float]]:
    """The first ``STEPS`` logged steps of the golden run (with ``changes`` to its settings)."""
    cache = write_tiny_cache(tmp_path / "cache", num_shards=8, shard_size=32, size=16, seed=0)
    run_dir = tmp_path / "run"
    cfg = load_run_config(DEFAULT_DATA_CONFIG, DEFAULT_TRAIN_CONFIG, DEFAULT_MODEL_CONFIG,
                          overrides(run_dir, cache, **{**RUN, **changes}))
    threads = torch.get_num_threads()
    try:
        train(cfg, device="cpu")
    finally:
        torch.set_num_threads(threads)  # the run sets one thread; the tests after it keep their own
    steps = [r for r in read_metrics(run_dir) if r["kind"] == "step"][:STEPS]
    assert len(steps) == STEPS, f"the run logged {len(steps)} steps, the curve needs {STEPS}"
    return [{"step": r["global_step"], "loss": r["loss"], "lr": r["lr"]} for r in steps]


def first_difference(got: list[dict[str, float]], want: list[dict[str, float]]) -> str | None:
    """The first step where ``got`` leaves ``want`` beyond the tolerance, described; None if it never does."""
    for g, w in zip(got, want, strict=True):
        if g["step"] != w["step"]:
            return f"logged step {g['step']} where the golden curve has step {w['step']}"
        for key in ("lr", "loss"):
            if not math.isclose(g[key], w[key], rel_tol=RTOL, abs_tol=ATOL):
                return f"step {w['step']}: {key} {g[key]!r}, golden {w[key]!r}"
    return None


def test_the_first_steps_follow_the_golden_loss_curve(tmp_path: Path) -> None:
    got = run_curve(tmp_path)
    if os.environ.get(REGENERATE) == "1":
        head = {"regenerate": f"{REGENERATE}=1 python -m pytest tests/kd/test_golden_loss.py",
                "torch": torch.__version__}
        rows = ",\n".join(f"  {json.dumps(step)}" for step in got)  # one step per line: diffs read step by step
        GOLDEN.write_text(json.dumps(head, indent=1)[:-2] + f',\n "steps": [\n{rows}\n ]\n}}\n')
        pytest.skip(f"{GOLDEN.name} regenerated; review and commit it")
    want = json.loads(GOLDEN.read_text())["steps"]
    assert len(want) == STEPS
    difference = first_difference(got, want)
    assert difference is None, (f"the loss curve changed at {difference}. If the change to the loss, schedule or "
                                f"data order is intended, rerun with {REGENERATE}=1 and commit {GOLDEN.name}")
