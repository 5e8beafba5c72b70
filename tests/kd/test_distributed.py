"""Two gloo processes under torchrun train in lockstep: the same steps, identical weights, one writer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import overrides


def torchrun(command: str, sets: list[str], *args: str) -> subprocess.CompletedProcess:
    """``shardstore COMMAND`` on two gloo ranks (CPU); asserts it succeeded."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "shardstore", command, "--device", "cpu", *args, *sets]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_two_cpu_ranks_take_the_same_steps_and_end_identical(tiny_cache: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "ddp"
    sets = [a for o in overrides(run_dir, tiny_cache, train__epochs=2) for a in ("--set", o)]
    proc = torchrun("train", sets)
    ranks = [json.loads((run_dir / f"final_rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 2 * 4  # 128 samples / (2 ranks x 16) per epoch
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    assert proc.stdout.count("resolved configuration:") == 1  # rank 0 alone prints and logs
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("epoch_*.pt")) == ["epoch_0000.pt", "epoch_0001.pt"]


@pytest.mark.slow
def test_two_cpu_ranks_train_in_lockstep_from_cached_targets(tiny_cache: Path, tmp_path: Path) -> None:
    """Each rank picks its samples' stored views from its own stream; DDP keeps the weights identical."""
    import shutil

    from shardstore.config.resolve import (
        DEFAULT_DATA_CONFIG,
        DEFAULT_MODEL_CONFIG,
        DEFAULT_TRAIN_CONFIG,
        load_run_config,
    )
    from shardstore.kd.teacher_cache import fill_teacher_cache

    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache, cache)
    fill_teacher_cache(load_run_config(DEFAULT_DATA_CONFIG, DEFAULT_TRAIN_CONFIG, DEFAULT_MODEL_CONFIG,
                                       overrides(tmp_path / "fill", cache)), views=3, topk=4, embeddings=True,
                       fsync=False)
    run_dir = tmp_path / "ddp"
    sets = [a for o in overrides(run_dir, cache, train__epochs=2, data__teacher_targets="teacher",
                                 train__loss__feature_loss="cosine", train__loss__feature_weight=0.5,
                                 model__teacher__name="no_such_model") for a in ("--set", o)]
    torchrun("train", sets)
    ranks = [json.loads((run_dir / f"final_rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 2 * 4
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all({"kd", "feature"} <= set(r) for r in steps if r["kind"] == "step")  # both cached targets teach


@pytest.mark.slow
def test_two_ranks_fill_the_teacher_cache_like_one_process(tiny_cache: Path, tmp_path: Path) -> None:
    """Under torchrun each rank fills its share of the shards; the files equal a single process's fill."""
    import shutil

    import numpy as np

    from shardstore.config.resolve import (
        DEFAULT_DATA_CONFIG,
        DEFAULT_MODEL_CONFIG,
        DEFAULT_TRAIN_CONFIG,
        load_run_config,
    )
    from shardstore.kd.teacher_cache import fill_teacher_cache
    from shardstore.store.reader import ShardStore

    single, multi = tmp_path / "single", tmp_path / "multi"
    shutil.copytree(tiny_cache, single)
    shutil.copytree(tiny_cache, multi)
    report = fill_teacher_cache(load_run_config(DEFAULT_DATA_CONFIG, DEFAULT_TRAIN_CONFIG, DEFAULT_MODEL_CONFIG,
                                                overrides(tmp_path / "r", single)), views=2, topk=3, fsync=False)
    assert report.shards_filled == list(range(8))
    sets = [a for o in overrides(tmp_path / "r", multi) for a in ("--set", o)]
    proc = torchrun("cache-teacher", sets, "--views", "2", "--topk", "3")
    assert proc.stdout.count("filled 8 shard(s) (256 images x 2 views") == 1  # rank 0 reports for both
    a, b = ShardStore.open(single), ShardStore.open(multi)
    names = ["teacher_views", "teacher_topk_index", "teacher_topk_logp", "teacher_tail_logp"]
    assert b.manifest.positions_with(names).tolist() == list(range(8))
    for p in range(8):
        assert np.array_equal(a.field(p, "teacher_views"), b.field(p, "teacher_views"))
        assert np.array_equal(a.field(p, "teacher_topk_index"), b.field(p, "teacher_topk_index"))
        np.testing.assert_allclose(a.field(p, "teacher_topk_logp").astype(np.float32),
                                   b.field(p, "teacher_topk_logp").astype(np.float32), atol=2e-3)
