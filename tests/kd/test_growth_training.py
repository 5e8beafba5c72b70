"""Training on a cache that grows while the run goes on (``data.refresh_manifest``): shards added between epochs
are trained on from the next epoch (held-out shards never), and a run preempted mid-epoch after a growth, with more
shards arriving while it is down, resumes to the same weights as the uninterrupted run with the same growth."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from shardstore import ShardWriter, build_manifest
from shardstore.cli import main
from shardstore.config.resolve import DEFAULT_DATA_CONFIG, DEFAULT_MODEL_CONFIG, DEFAULT_TRAIN_CONFIG, load_run_config
from shardstore.kd.checkpoint import load_checkpoint
from shardstore.kd.metrics import read_metrics
from shardstore.kd.preempt import TrainingPreempted
from shardstore.kd.trainer import train

from .conftest import overrides, write_tiny_cache

CONFIGS = [DEFAULT_DATA_CONFIG, DEFAULT_TRAIN_CONFIG, DEFAULT_MODEL_CONFIG]
SHARD_SIZE = 16
TIMING_KEYS = {"samples_per_s", "time_s", "wait_frac"}
# 8 shards of 16: shards 6 and 7 are held out for evaluation, 0-5 train (6 steps of 16 per epoch, whole cache).
HELD_OUT = [6, 7]
FIRST = [0, 1, 2, 3, 4, 5]
# Shards that arrive after an epoch ends (after its checkpoint), before the next one starts.
GROWTH = {0: [8, 9], 1: [10, 11]}


def add_shards(root: Path, shard_ids: list[int]) -> None:
    """Learnable shards (as in ``write_tiny_cache``) with ids ``shard_ids``, then a manifest rebuild."""
    for shard_id in shard_ids:
        rng = np.random.default_rng(100 + shard_id)
        labels = rng.integers(0, 10, SHARD_SIZE)
        images = rng.integers(0, 40, (SHARD_SIZE, 3, 16, 16)).astype(np.uint8)
        for i, c in enumerate(labels):
            y, x = divmod(int(c), 4)
            images[i, :, 2 + 3 * y: 5 + 3 * y, 2 + 3 * x: 5 + 3 * x] = 220
        with ShardWriter(root, SHARD_SIZE, start_shard=shard_id, num_shards=1, fsync=False) as w:
            w.add_batch({"images": images, "labels": labels.astype(np.int64)})
    build_manifest(root)


def cfg(run_dir: Path, cache: Path, **extra: Any):
    values = {"train__epochs": 3, "data__shards_per_epoch": None, "data__refresh_manifest": True, **extra}
    return load_run_config(*CONFIGS, overrides(run_dir, cache, **values))


class Growing:
    """A reporter that grows ``cache`` after the epochs in ``GROWTH`` end (once: a resumed run does not add them
    again), records each epoch's shards, and sends SIGTERM at ``stop_at`` = (epoch, logged step)."""

    def __init__(self, cache: Path, stop_at: tuple[int, int] | None = None) -> None:
        self.cache, self.stop_at = cache, stop_at
        self.shards: dict[int, list[int]] = {}

    def epoch_start(self, epoch: int, epochs: int, shards: list[int], steps: int) -> None:
        self.shards[epoch] = list(shards)

    def step(self, epoch: int, step: int, values: dict[str, float]) -> None:
        if (epoch, step) == self.stop_at:
            os.kill(os.getpid(), signal.SIGTERM)

    def epoch_end(self, epoch: int, values: dict[str, Any]) -> None:
        new = [i for i in GROWTH.get(epoch, []) if not (self.cache / f"shard_{i:06d}").exists()]
        if new:
            add_shards(self.cache, new)


def step_rows(run_dir: Path) -> list[tuple]:
    return [(r["global_step"], r["epoch"], r["step"], r["loss"], r["lr"])
            for r in read_metrics(run_dir) if r["kind"] == "step"]


def epoch_rows(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_metrics(run_dir) if r["kind"] == "epoch"]


def weights(run_dir: Path) -> str:
    return json.loads((run_dir / "final_rank0.json").read_text())["weights_sha256"]


@pytest.fixture(scope="module")
def whole(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Growing]:
    """The uninterrupted run: 3 epochs, shards 8-9 arrive after epoch 0 and 10-11 after epoch 1."""
    base = tmp_path_factory.mktemp("growth")
    cache = write_tiny_cache(base / "cache", num_shards=8, shard_size=SHARD_SIZE)
    reporter = Growing(cache)
    train(cfg(base / "run", cache), reporter=reporter)
    return base / "run", reporter


@pytest.mark.slow
def test_shards_added_between_epochs_are_trained_on_from_the_next_epoch(whole: tuple[Path, Growing]) -> None:
    run_dir, reporter = whole
    want = {0: FIRST, 1: FIRST + GROWTH[0], 2: FIRST + GROWTH[0] + GROWTH[1]}
    assert {e: sorted(s) for e, s in reporter.shards.items()} == want  # what the reporter was told
    rows = epoch_rows(run_dir)
    assert {r["epoch"]: sorted(r["shards"]) for r in rows} == want  # what the metrics say was read
    assert [r["batches"] for r in rows] == [6, 8, 10]  # every sample of the new shards was trained on
    assert all(set(HELD_OUT).isdisjoint(s) for s in want.values())
    final = load_checkpoint(run_dir / "checkpoints" / "epoch_0002.pt")
    assert final["split"]["held_out_ids"].tolist() == HELD_OUT
    assert final["split"]["train_shard_ids"].tolist() == want[2]
    assert all(r["eval_samples"] == 2 * SHARD_SIZE for r in rows)  # evaluation stays on the held-out shards


def test_without_refresh_manifest_the_run_keeps_the_shards_it_started_with(tmp_path: Path) -> None:
    cache = write_tiny_cache(tmp_path / "cache", num_shards=8, shard_size=SHARD_SIZE)
    reporter = Growing(cache)
    train(cfg(tmp_path / "run", cache, train__epochs=2, data__refresh_manifest=False), reporter=reporter)
    assert (cache / "shard_000009").exists()
    assert {e: sorted(s) for e, s in reporter.shards.items()} == {0: FIRST, 1: FIRST}


@pytest.mark.parametrize("at", [(1, 3), (2, 5)], ids=["epoch-after-first-growth", "epoch-after-second-growth"])
@pytest.mark.slow
def test_a_run_preempted_mid_epoch_after_growth_resumes_to_the_same_weights(
        tmp_path: Path, whole: tuple[Path, Growing], at: tuple[int, int]) -> None:
    whole_run, whole_reporter = whole
    cache = write_tiny_cache(tmp_path / "cache", num_shards=8, shard_size=SHARD_SIZE)
    run_dir = tmp_path / "run"
    stopped = Growing(cache, stop_at=at)
    with pytest.raises(TrainingPreempted, match=r"saved .*recovery\.pt$"):
        train(cfg(run_dir, cache), reporter=stopped)
    assert stopped.shards == {e: whole_reporter.shards[e] for e in range(at[0] + 1)}
    assert load_checkpoint(run_dir / "checkpoints" / "recovery.pt")["epoch"] == at[0]
    # More shards arrive while the run is down: in epoch 1, those the uninterrupted run got after it; in the last
    # epoch, shards no epoch of the uninterrupted run read (they must not enter the interrupted epoch either).
    add_shards(cache, GROWTH[1] if at[0] == 1 else [12, 13])
    resumed = Growing(cache)
    result = train(cfg(run_dir, cache), resume=True, reporter=resumed)
    # The stopped epoch is finished on its own shards; the new ones join at the next epoch, as in the whole run.
    assert resumed.shards == {e: whole_reporter.shards[e] for e in range(at[0], 3)}
    assert result.weights_sha256 == weights(whole_run)
    assert step_rows(run_dir) == step_rows(whole_run)
    assert epoch_rows(run_dir) == epoch_rows(whole_run)


# -- `shardstore train` with the key in data_config.yaml ------------------------------------------------------------


@pytest.mark.parametrize("refresh", [True, False], ids=["refresh", "no-refresh"])
@pytest.mark.slow
def test_shardstore_train_with_refresh_manifest_in_data_config_trains_on_the_grown_cache(
        tmp_path: Path, refresh: bool, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    cache = write_tiny_cache(tmp_path / "cache", num_shards=8, shard_size=SHARD_SIZE)
    config = tmp_path / "data_config.yaml"
    config.write_text(yaml.safe_dump({"cache_root": str(cache), "shards_per_epoch": None, "loader_threads": 1,
                                      "refresh_manifest": refresh}))
    grower = Growing(cache)
    # The CLI's own reporter grows the cache at the end of the first epoch.
    monkeypatch.setattr("shardstore.cli.train.RichReporter.epoch_end",
                        lambda self, epoch, values: grower.epoch_end(epoch, values))
    run = tmp_path / "run"
    sets = [a for o in overrides(run, cache, train__epochs=2) if not o.startswith("data.") for a in ("--set", o)]
    code = main(["train", "--data-config", str(config), *sets, "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert (cache / "shard_000009").exists()
    second = FIRST + GROWTH[0] if refresh else FIRST
    assert [sorted(r["shards"]) for r in epoch_rows(run)] == [FIRST, second]
    assert f"epoch 2/2: {len(second)} steps over {len(second)} shards" in captured.out
    assert load_checkpoint(run / "checkpoints" / "epoch_0001.pt")["split"]["held_out_ids"].tolist() == HELD_OUT
