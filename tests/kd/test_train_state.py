"""What a run keeps across an interruption: the epoch's sums, the held-out split, the best epoch; what stops it:
a non-finite loss, a full disk; and the one-line errors for a run directory, seed or teacher file that cannot work."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from shardstore import ShardWriter, build_manifest
from shardstore.config.resolve import DEFAULT_DATA_CONFIG, DEFAULT_MODEL_CONFIG, DEFAULT_TRAIN_CONFIG, load_run_config
from shardstore.errors import ConfigError, DiskFullError
from shardstore.kd import trainer as trainer_module
from shardstore.kd.checkpoint import load_checkpoint
from shardstore.kd.divergence import NonFiniteLossError
from shardstore.kd.metrics import read_metrics
from shardstore.kd.trainable import Trainable
from shardstore.kd.trainer import train

from .conftest import overrides, write_tiny_cache

CONFIGS = [DEFAULT_DATA_CONFIG, DEFAULT_TRAIN_CONFIG, DEFAULT_MODEL_CONFIG]
DEAD_PID = 4_194_305  # above PID_MAX_LIMIT (2**22): no process can have it


def cfg(run_dir: Path, cache: Path, **extra: Any):
    return load_run_config(*CONFIGS, overrides(run_dir, cache, **extra))


class Stop(Exception):
    """Stands in for a kill: raised from the reporter, after the loop logged the step (or saved the epoch)."""


class StopAt:
    """Raise ``Stop`` at ``(epoch, step)`` (1-based step), or right after ``epoch`` ended when ``step`` is None."""

    def __init__(self, epoch: int, step: int | None = None) -> None:
        self.epoch, self.at_step = epoch, step

    def epoch_start(self, *args: Any) -> None:
        pass

    def step(self, epoch: int, step: int, values: dict[str, float]) -> None:
        if (epoch, step) == (self.epoch, self.at_step):
            raise Stop

    def epoch_end(self, epoch: int, values: dict[str, Any]) -> None:
        if self.at_step is None and epoch == self.epoch:
            raise Stop


def rows(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    return [r for r in read_metrics(run_dir) if r["kind"] == kind]


def losses(run_dir: Path) -> list[tuple]:
    return [(r["global_step"], r["epoch"], r["step"], r["loss"], r["kd"], r["ce"], r["lr"])
            for r in rows(run_dir, "step")]


def latest_name(run_dir: Path) -> str:
    return json.loads((run_dir / "checkpoints" / "latest.json").read_text())["path"]


def same_epoch_rows(a: list[dict], b: list[dict]) -> None:
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b]
    for x, y in zip(a, b):
        for key in ("global_step", "batches", "shards"):
            assert x[key] == y[key], key
        for key in ("train_loss", "train_kd", "train_ce", "eval_top1", "eval_kl"):
            assert x[key] == pytest.approx(y[key], rel=1e-6, abs=1e-9), key


# -- resuming: the epoch's sums and the next epoch -----------------------------------------------------------------


@pytest.mark.slow
def test_resumed_runs_report_what_an_uninterrupted_run_reports(tiny_cache: Path, tmp_path: Path) -> None:
    common = {"train__epochs": 2, "train__checkpoint__every_steps": 2, "train__checkpoint__best_metric": "loss"}
    whole = tmp_path / "whole"
    train(cfg(whole, tiny_cache, **common))

    # Stopped inside epoch 0 (after the recovery checkpoint of step 4): the resumed epoch's row covers all 8 batches.
    mid = tmp_path / "mid"
    with pytest.raises(Stop):
        train(cfg(mid, tiny_cache, **common), reporter=StopAt(0, 5))
    assert latest_name(mid) == "recovery.pt"
    train(cfg(mid, tiny_cache, **common), resume=True)

    # Stopped right after epoch 0's checkpoint: the resumed run starts at epoch 1 and does not repeat epoch 0.
    end = tmp_path / "end"
    with pytest.raises(Stop):
        train(cfg(end, tiny_cache, **common), reporter=StopAt(0))
    assert latest_name(end) == "epoch_0000.pt"
    resumed = train(cfg(end, tiny_cache, **common), resume=True)

    for run in (mid, end):
        same_epoch_rows(rows(run, "epoch"), rows(whole, "epoch"))
        assert losses(run) == losses(whole)  # every step once, the same batches
        best, best_whole = load_checkpoint(run / "checkpoints" / "best.pt"), load_checkpoint(whole / "checkpoints" /
                                                                                              "best.pt")
        assert (best["epoch"], best["global_step"]) == (best_whole["epoch"], best_whole["global_step"])
    assert resumed.global_step == 16 and rows(end, "step")[0]["global_step"] == 1


class Scripted:
    """The metric of each epoch, chosen so the best, the worst, the first and the last are four different epochs."""

    values = [0.5, 0.9, 0.2, 0.6]


@pytest.mark.slow
@pytest.mark.parametrize("metric", ["top1", "loss"])
def test_best_pt_is_the_epoch_with_the_best_metric(tiny_cache: Path, tmp_path: Path, metric: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    epochs: list[int] = []
    real_train_epoch = trainer_module._Run.train_epoch

    def train_epoch(self: Any, epoch: int) -> dict[str, Any]:
        values = real_train_epoch(self, epoch)
        epochs.append(epoch)
        if metric == "loss":  # lower is better: the loss of epoch e is 1 - values[e]
            values["train_loss"] = 1.0 - Scripted.values[epoch]
        return values

    monkeypatch.setattr(trainer_module._Run, "train_epoch", train_epoch)
    monkeypatch.setattr(trainer_module, "evaluate", lambda *a, **k: {"top1": Scripted.values[epochs[-1]]})
    run = tmp_path / metric
    train(cfg(run, tiny_cache, train__epochs=4, train__max_steps_per_epoch=2, train__checkpoint__best_metric=metric,
              train__checkpoint__keep_last=4))
    assert load_checkpoint(run / "checkpoints" / "best.pt")["epoch"] == 1
    assert load_checkpoint(run / "checkpoints" / "epoch_0003.pt")["best_epoch"] == 1


# -- a cache that grew between the checkpoint and the resume -----------------------------------------------------------


def add_shards(root: Path, first_id: int, count: int, shard_size: int) -> None:
    rng = np.random.default_rng(first_id)
    n = count * shard_size
    with ShardWriter(root, shard_size, start_shard=first_id, fsync=False) as w:
        w.add_batch({"images": rng.integers(0, 255, (n, 3, 16, 16)).astype(np.uint8),
                     "labels": rng.integers(0, 10, n).astype(np.int64)})
    build_manifest(root)


@pytest.mark.slow
def test_a_grown_cache_keeps_the_split_and_the_resumed_epoch(tmp_path: Path) -> None:
    # Held out: shards 6 and 7; training: 0-5, every shard each epoch (6 steps of 16).
    common = {"train__epochs": 3, "train__checkpoint__every_steps": 2, "data__shards_per_epoch": None,
              "train__checkpoint__keep_last": 3}
    old = write_tiny_cache(tmp_path / "old", num_shards=8, shard_size=16)
    whole = tmp_path / "whole"
    train(cfg(whole, old, **common))

    grown = write_tiny_cache(tmp_path / "grown", num_shards=8, shard_size=16)
    run = tmp_path / "run"
    with pytest.raises(Stop):
        train(cfg(run, grown, **common), reporter=StopAt(1, 3))  # recovery checkpoint after epoch 1's step 2
    assert latest_name(run) == "recovery.pt"
    add_shards(grown, 8, 4, 16)  # shards 8-11 arrive; the cache's last two are now 10 and 11
    train(cfg(run, grown, **common), resume=True)

    final = load_checkpoint(run / "checkpoints" / "epoch_0002.pt")
    assert final["split"]["held_out_ids"].tolist() == [6, 7]
    assert final["split"]["train_shard_ids"].tolist() == [0, 1, 2, 3, 4, 5, 8, 9, 10, 11]
    mine, theirs = rows(run, "epoch"), rows(whole, "epoch")
    # Epochs 0 and 1 (resumed inside) are those of the old cache: same batches, same held-out evaluation.
    same_epoch_rows(mine[:2], theirs[:2])
    assert [x for x in losses(run) if x[1] < 2] == [x for x in losses(whole) if x[1] < 2]
    # Epoch 2 takes the new shards, and still evaluates on shards 6 and 7 only.
    assert sorted(mine[2]["shards"]) == [0, 1, 2, 3, 4, 5, 8, 9, 10, 11] and mine[2]["batches"] == 10
    assert mine[2]["eval_samples"] == 32


@pytest.mark.slow
def test_a_resume_that_cannot_continue_its_epoch_names_the_flag_that_does(tmp_path: Path) -> None:
    cache = write_tiny_cache(tmp_path / "cache", num_shards=8, shard_size=16)
    common = {"train__epochs": 2, "train__checkpoint__every_steps": 2, "data__shards_per_epoch": None}
    run = tmp_path / "run"
    with pytest.raises(Stop):
        train(cfg(run, cache, **common), reporter=StopAt(1, 3))
    for f in (cache / "shard_000002").iterdir():  # a shard of the interrupted epoch goes away
        f.unlink()
    (cache / "shard_000002").rmdir()
    build_manifest(cache)
    with pytest.raises(ConfigError, match=r"recovery.pt: cannot continue epoch 2 where it stopped: its shard 2 is no "
                                          r"longer in the cache; resume from the end of an earlier epoch instead "
                                          r"with --resume-from .*epoch_0000.pt"):
        train(cfg(run, cache, **common), resume=True)
    train(cfg(run, cache, **common), resume=run / "checkpoints" / "epoch_0000.pt")  # what the message says works
    assert [r["epoch"] for r in rows(run, "epoch")] == [0, 1]


# -- what stops a run ----------------------------------------------------------------------------------------------


def poison_from(monkeypatch: pytest.MonkeyPatch, call: int) -> None:
    """From the ``call``-th forward pass on, the loss and its parts are NaN (as an lr far too high makes them)."""
    real = Trainable.forward
    calls = [0]

    def forward(self: Trainable, *args: Any, **kwargs: Any) -> tuple:
        loss, parts, logits = real(self, *args, **kwargs)
        calls[0] += 1
        if calls[0] >= call:
            nan = torch.tensor(float("nan"))
            loss, parts = loss * nan, {k: v * nan for k, v in parts.items()}
        return loss, parts, logits

    monkeypatch.setattr(Trainable, "forward", forward)


@pytest.mark.slow
@pytest.mark.parametrize("log_every", [1, 100])  # caught on a logged step, or before the next checkpoint
def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
        tiny_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, log_every: int) -> None:
    poison_from(monkeypatch, 12)  # epoch 1, step 4 (8 steps per epoch)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"^the training loss became NaN or infinite in epoch 2 by step 4 "
                                                 r"\(global step 12\); training stopped without saving these weights, "
                                                 r"and the last good checkpoint is .*recovery.pt; lower train.lr "
                                                 r"\(now 0.01\)") as err:
        train(cfg(run, tiny_cache, train__epochs=2, train__checkpoint__every_steps=2,
                  train__log__every_steps=log_every))
    assert "\n" not in str(err.value)
    kept = load_checkpoint(run / "checkpoints" / "recovery.pt")
    assert kept["global_step"] == 10 and latest_name(run) == "recovery.pt"
    assert all(torch.isfinite(v).all() for v in kept["student"].values() if v.is_floating_point())
    assert all(r["loss"] is not None for r in rows(run, "step"))  # no NaN row was logged


@pytest.mark.slow
def test_weights_that_became_nan_after_a_finite_loss_are_never_saved(
        tiny_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_step = torch.optim.AdamW.step
    calls = [0]

    def step(self: torch.optim.AdamW, *args: Any, **kwargs: Any) -> Any:
        out = real_step(self, *args, **kwargs)
        calls[0] += 1
        if calls[0] == 12:  # the update right before the recovery checkpoint of global step 12
            with torch.no_grad():
                for group in self.param_groups:
                    for p in group["params"]:
                        p.fill_(float("nan"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"in epoch 2 by step 4 \(global step 12\)"):
        train(cfg(run, tiny_cache, train__epochs=2, train__checkpoint__every_steps=2))
    assert load_checkpoint(run / "checkpoints" / "recovery.pt")["global_step"] == 10


@pytest.mark.slow
@pytest.mark.parametrize("failing", [".epoch_0001.pt.tmp-", ".best.pt.tmp-"])
def test_a_full_disk_stops_training_with_one_line_and_the_previous_checkpoint_intact(
        tiny_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str) -> None:
    real = os.fsync

    def fsync(fd: int) -> None:
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(failing):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    # The epoch file of epoch 1 fails; or the best.pt copy of the last epoch (its epoch file and latest.json are done).
    epochs = 2 if failing.startswith(".epoch") else 1
    monkeypatch.setattr(os, "fsync", fsync)
    run = tmp_path / "run"
    with pytest.raises(DiskFullError, match=r"^no space left on device: writing .*; free space"):
        train(cfg(run, tiny_cache, train__epochs=epochs))
    monkeypatch.undo()
    checkpoints = run / "checkpoints"
    assert not [p for p in checkpoints.iterdir() if ".tmp-" in p.name]
    assert latest_name(run) == "epoch_0000.pt"  # the finished epoch is reachable, whatever write failed after it
    assert (checkpoints / "best.pt").exists() is (epochs == 2)
    train(cfg(run, tiny_cache, train__epochs=epochs), resume=True)
    assert [r["epoch"] for r in rows(run, "epoch")] == list(range(epochs))
    # Resume made the best.pt copy the full disk interrupted.
    assert load_checkpoint(checkpoints / "best.pt")["global_step"] == load_checkpoint(checkpoints / "epoch_0000.pt")[
        "global_step"] or epochs == 2


def test_a_run_starts_by_removing_what_killed_writers_left(tiny_cache: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    stale = [run / "checkpoints" / f".recovery.pt.tmp-{DEAD_PID}-ab12", run / "checkpoints" /
             f".epoch_0003.pt.tmp-{DEAD_PID}-cd34", run / "checkpoints" / f".latest.json.tmp-{DEAD_PID}-ef56",
             run / f".config.yaml.tmp-{DEAD_PID}-0a0a"]
    for path in stale:
        path.write_bytes(b"x" * 100)
    train(cfg(run, tiny_cache, train__epochs=1, train__max_steps_per_epoch=1, train__eval__every_epochs=0))
    assert not [p for p in (run / "checkpoints").iterdir() if ".tmp-" in p.name]
    assert not [p for p in run.iterdir() if ".tmp-" in p.name]


# -- one-line errors for what cannot work ---------------------------------------------------------------------------


def test_a_run_directory_that_cannot_hold_a_run_is_one_line(tiny_cache: Path, tmp_path: Path) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = {a_file: r"a_file is a file, not a directory; choose another train.run_dir",
             a_file / "run": r"a_file/run is inside .*a_file, which is a file",
             Path("/proc/shardstore-run"): r"/proc/shardstore-run is under /proc, a kernel file system, not storage"}
    for run_dir, message in cases.items():
        with pytest.raises(ConfigError, match=r"^train.run_dir .*" + message):
            train(cfg(run_dir, tiny_cache, train__epochs=1))
    assert a_file.read_text() == "x"


def test_a_seed_torch_cannot_take_is_one_line(tiny_cache: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"seed.*1180591620717411303424"):  # the YAML layer refuses it
        train(cfg(tmp_path / "run", tiny_cache, train__seed=2**70, train__epochs=1))
    # A config built in Python skips the YAML checks; torch.manual_seed would overflow deep inside the trainer.
    base = cfg(tmp_path / "run", tiny_cache, train__epochs=1)
    huge = dataclasses.replace(base, train=dataclasses.replace(base.train, seed=2**70))
    with pytest.raises(ConfigError, match=r"^train_config: seed 1180591620717411303424 is out of range; use an "
                                          r"integer from 0 to 2\*\*64 - 1"):
        train(huge)


def test_a_teacher_checkpoint_that_is_not_one_is_one_line(tiny_cache: Path, tmp_path: Path) -> None:
    (tmp_path / "teacher.txt").write_text("weights: none\n")
    np.save(tmp_path / "teacher.npy", np.zeros((3, 3), np.float32))
    for name, message in (("teacher.txt", "is not a readable torch.save file"),
                          ("teacher.npy", "is a NumPy .npy file, not a torch.save file")):
        with pytest.raises(ConfigError, match=rf"{name}: {message}.*torch.save\(model.state_dict\(\), path\)"):
            train(cfg(tmp_path / "run", tiny_cache, train__epochs=1, model__teacher__checkpoint=str(tmp_path / name)))


@pytest.mark.parametrize("float_images", [False, True])
def test_a_float_cache_gets_the_nan_image_hint_first(tiny_cache: Path, tmp_path: Path, float_images: bool) -> None:
    from shardstore.kd.divergence import diverged

    err = diverged(cfg(tmp_path / "run", tiny_cache), epoch=0, step=3, global_step=3, last_good=None, autocast=False,
                   float_images=float_images)
    hint = "check the cache's float images for NaN or inf values"
    assert (hint in str(err)) is float_images and "lower train.lr" in str(err) and "\n" not in str(err)
    if float_images:
        assert str(err).index(hint) < str(err).index("lower train.lr")
