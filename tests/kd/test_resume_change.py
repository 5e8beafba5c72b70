"""Resuming with a changed configuration: settings fixed for a run are refused in one line naming each key and
both values (before anything is loaded); settings that may change are applied, listed, and a changed length
continues the lr schedule where a run started with it would be."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest

from shardstore.cli import main
from shardstore.config.resolve import DEFAULT_DATA_CONFIG, DEFAULT_MODEL_CONFIG, DEFAULT_TRAIN_CONFIG, load_run_config
from shardstore.errors import ConfigError
from shardstore.kd.checkpoint import load_checkpoint, save_checkpoint
from shardstore.kd.metrics import read_metrics
from shardstore.kd.preempt import TrainingPreempted
from shardstore.kd.schedule import warmup_cosine_factor
from shardstore.kd.trainer import train

from .conftest import overrides

CONFIGS = [DEFAULT_DATA_CONFIG, DEFAULT_TRAIN_CONFIG, DEFAULT_MODEL_CONFIG]
STOP_STEP = 11  # epoch 2 of 2, after step 3 of 8: past the warmup, inside the cosine


def cfg(run_dir: Path, cache: Path, **extra: Any):
    return load_run_config(*CONFIGS, overrides(run_dir, cache, **{"train__epochs": 2, **extra}))


class SigTermAt:
    def __init__(self, epoch: int, step: int) -> None:
        self.at = (epoch, step)
        self.notes: list[str] = []

    def epoch_start(self, *args: Any) -> None:
        pass

    def step(self, epoch: int, step: int, values: dict[str, float]) -> None:
        if (epoch, step) == self.at:
            os.kill(os.getpid(), signal.SIGTERM)

    def epoch_end(self, *args: Any) -> None:
        pass

    def note(self, line: str) -> None:
        self.notes.append(line)


@pytest.fixture(scope="module")
def stopped(tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run preempted at global step 11 (recovery.pt), to copy for each resume."""
    run_dir = tmp_path_factory.mktemp("stopped") / "run"
    with pytest.raises(TrainingPreempted):
        train(cfg(run_dir, tiny_cache), reporter=SigTermAt(1, 3))
    return run_dir


@pytest.fixture
def run(stopped: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(stopped, copy)
    return copy


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def lr_rows(run_dir: Path) -> dict[int, float]:
    return {r["global_step"]: r["lr"] for r in read_metrics(run_dir) if r["kind"] == "step"}


# -- refused -------------------------------------------------------------------------------------------------------

REFUSED = [
    ({"model__num_classes": 12}, "model.num_classes 10 -> 12"),
    ({"model__student__name": "resnet20"}, "model.student.name cnn_small -> resnet20"),
    ({"model__student__kwargs": {"width": 8}}, "model.student.kwargs {width: 4} -> {width: 8}"),
    ({"model__teacher__name": "resnet20"}, "model.teacher.name cnn_small -> resnet20"),
    ({"train__optimizer": "sgd"}, "train.optimizer adamw -> sgd"),
    ({"train__seed": 1}, "train.seed 0 -> 1"),
    ({"data__random_subset_seed": 7}, "data.random_subset_seed 42 -> 7"),
    ({"data__shard_policy": "permutation"}, "data.shard_policy random -> permutation"),
    ({"train__loss__alpha": 0.5}, "train.loss.alpha 0.9 -> 0.5"),
    ({"train__eval__held_out_shards": 3}, "train.eval.held_out_shards 2 -> 3"),
    ({"train__batch_size": 32}, "train.batch_size x ranks (the global batch) 16 -> 32"),
]


@pytest.mark.parametrize(("change", "named"), REFUSED, ids=[n.split(" ")[0] for _, n in REFUSED])
@pytest.mark.slow
def test_a_setting_fixed_for_the_run_is_refused_naming_both_values(run: Path, tiny_cache: Path, change: dict,
                                                                   named: str) -> None:
    before = snapshot(run)
    with pytest.raises(ConfigError) as err:
        train(cfg(run, tiny_cache, **change), resume=True)
    assert str(err.value) == (f"{run}/checkpoints/recovery.pt: cannot resume with these settings changed, they are "
                              f"fixed for a run: {named}; resume with the values the run started with (see its "
                              "config.yaml), or start a new run in another train.run_dir")
    assert snapshot(run) == before  # refused before anything was written


def test_every_fixed_change_is_named_in_one_line_through_the_cli(run: Path, tiny_cache: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    sets = [a for o in overrides(run, tiny_cache, train__epochs=2, model__num_classes=12, train__optimizer="sgd",
                                 model__student__name="resnet20", train__lr=0.5) for a in ("--set", o)]
    assert main(["train", *sets, "--resume", "--device", "cpu"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("WARNING")]
    assert len(err) == 1 and "Traceback" not in err[0]
    assert ": cannot resume with these settings changed, they are fixed for a run: train.optimizer adamw -> sgd, " \
           "model.num_classes 10 -> 12, model.student.name cnn_small -> resnet20; resume with" in err[0]
    assert "train.lr" not in err[0]  # an allowed change is not in the refusal


def test_a_checkpoint_without_a_recorded_config_is_compared_with_config_yaml(run: Path, tiny_cache: Path) -> None:
    path = run / "checkpoints" / "recovery.pt"
    state = load_checkpoint(path)
    del state["config"]  # as a checkpoint of an older shardstore
    save_checkpoint(state, path)
    with pytest.raises(ConfigError, match=r"fixed for a run: model.num_classes 10 -> 12;"):
        train(cfg(run, tiny_cache, model__num_classes=12), resume=True)


@pytest.mark.parametrize(("change", "message"), [
    ({"train__epochs": 1}, r"recovery.pt: train.epochs 1 is less than where the run is \(it is in epoch 2\); set "
                           r"train.epochs to at least 2$"),
    ({"train__max_steps_per_epoch": 2}, r"recovery.pt: train.max_steps_per_epoch 2 is less than the 3 steps epoch 2 "
                                        r"already took; set it to at least 3 \(it applies from this epoch on\)$"),
])
def test_a_length_shorter_than_the_run_already_went_is_refused(run: Path, tiny_cache: Path, change: dict,
                                                               message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        train(cfg(run, tiny_cache, **change), resume=True)


# -- applied -------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_more_epochs_and_another_lr_continue_the_schedule_a_run_with_them_would_have(
        run: Path, stopped: Path, tiny_cache: Path, tmp_path: Path) -> None:
    # The cache moved (copied to node-local disk, say): a path, not data; the manifest snapshot still matches.
    moved = tmp_path / "scratch" / "cache"
    shutil.copytree(tiny_cache, moved)
    reporter = SigTermAt(-1, -1)
    train(cfg(run, moved, train__epochs=3, train__lr=0.02, train__log__every_steps=2), resume=True,
          reporter=reporter)
    assert reporter.notes[0] == f"resuming from {run}/checkpoints/recovery.pt: in epoch 2/3 after step 3/8 (global " \
                                f"step {STOP_STEP}, 176 samples)"
    # (the run directory is a copy of the stopped one: its path changed too)
    assert reporter.notes[1] == (f"resuming with changed settings: data.cache_root {tiny_cache} -> {moved}, "
                                 f"train.run_dir {stopped} -> {run}, train.epochs 2 -> 3, train.lr 0.01 -> 0.02, "
                                 "train.log.every_steps 1 -> 2; the lr schedule now ends at update 24 (was 16) and "
                                 f"continues at {STOP_STEP}")
    fresh = tmp_path / "fresh"
    train(cfg(fresh, tiny_cache, train__epochs=3, train__lr=0.02))
    mine, theirs = lr_rows(run), lr_rows(fresh)
    after = [s for s in mine if s > STOP_STEP]
    assert after and max(after) == 24
    # From the resume on, the lr is the one a run started with 3 epochs and lr 0.02 has at that step: no restart.
    assert [mine[s] for s in after] == pytest.approx([theirs[s] for s in after], rel=1e-12)
    final = load_checkpoint(run / "checkpoints" / "epoch_0002.pt")
    assert final["total_steps"] == load_checkpoint(fresh / "checkpoints" / "epoch_0002.pt")["total_steps"] == 24
    assert [r["epoch"] for r in read_metrics(run) if r["kind"] == "epoch"] == [0, 1, 2]


@pytest.mark.slow
def test_schedule_and_optimizer_settings_apply_from_the_resume_on(run: Path, tiny_cache: Path) -> None:
    assert load_checkpoint(run / "checkpoints" / "recovery.pt")["total_steps"] == 16
    train(cfg(run, tiny_cache, train__warmup_steps=4, train__min_lr_ratio=0.1, train__weight_decay=0.01), resume=True)
    final = load_checkpoint(run / "checkpoints" / "epoch_0001.pt")
    assert final["total_steps"] == 16
    assert final["optimizer"]["param_groups"][0]["weight_decay"] == 0.01
    assert final["optimizer"]["param_groups"][1]["weight_decay"] == 0.0  # biases and norms stay undecayed
    lrs = lr_rows(run)  # the lr logged at global step g is the one of update g (the next)
    expected = {g: 0.01 * warmup_cosine_factor(g, total_steps=16, warmup_steps=4, min_lr_ratio=0.1)
                for g in range(STOP_STEP + 1, 17)}
    assert {g: lrs[g] for g in expected} == pytest.approx(expected, rel=1e-12)


def test_a_resume_with_nothing_changed_lists_no_change(stopped: Path, tiny_cache: Path) -> None:
    from shardstore.kd import run_changes

    state = load_checkpoint(stopped / "checkpoints" / "recovery.pt")
    changes = run_changes.check_resume(state, cfg(stopped, tiny_cache), run_dir=stopped, source=None, world_size=1)
    assert changes.applied == () and changes.reference == "the checkpoint"
    moved = run_changes.check_resume(state, cfg(stopped, tiny_cache, train__batch_size=8), run_dir=stopped,
                                     source=None, world_size=2)  # twice the ranks, half the batch: the same global
    assert [c.describe() for c in moved.applied] == ["train.batch_size 16 -> 8"]
