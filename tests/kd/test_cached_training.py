"""Training from cached teacher targets (``data.teacher_targets``): no teacher is loaded, the student still learns,
shards without targets are refused or skipped, a killed run resumes bit-identically, hybrid steps are taught live.

A real teacher is trained once for the module (labels only), exported as a bare state dict the way
``shardstore demo`` does, and its top-k targets are cached with ``fill_teacher_cache``; every test
then trains small students from that cache.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from shardstore import ConfigError, build_manifest
from shardstore.config.resolve import DEFAULT_DATA_CONFIG, DEFAULT_MODEL_CONFIG, DEFAULT_TRAIN_CONFIG, load_run_config
from shardstore.kd import distributed, trainer
from shardstore.kd import teacher as kd_teacher
from shardstore.kd.cached_targets import CachedTargets
from shardstore.kd.checkpoint import CheckpointManager, load_checkpoint
from shardstore.kd.data import build_data
from shardstore.kd.evaluate import evaluate
from shardstore.kd.metrics import read_metrics
from shardstore.kd.target_spec import read_target_spec
from shardstore.kd.teacher_cache import fill_teacher_cache
from shardstore.kd.trainer import train
from shardstore.store.reader import ShardStore

from .conftest import overrides, write_tiny_cache

#: every test needs the module's trained teacher and its filled cache (seconds on two cores)
pytestmark = pytest.mark.slow

CONFIGS = [DEFAULT_DATA_CONFIG, DEFAULT_TRAIN_CONFIG, DEFAULT_MODEL_CONFIG]

NUM_SHARDS, SHARD_SIZE = 10, 48  # shards 8 and 9 (96 samples) are held out for evaluation
TRAIN_SHARDS = list(range(NUM_SHARDS - 2))
TEACHER_WIDTH = 8
VIEWS, TOPK = 4, 5
#: every training shard every epoch, so which shards an epoch read is exact
ALL_SHARDS = {"data__shards_per_epoch": None}
#: the students of the accuracy tests: 8 epochs of 24 steps reached top-1 1.0 cached and live on six data/train
#: seeds (5 epochs: 0.885 to 1.0), with a teacher at 1.0
STUDENT_EPOCHS = 8
#: a top-1 that a student taught by the cached targets alone reliably beats (chance is 0.1)
MIN_TOP1 = 0.8


def cfg(run_dir: Path, cache: Path, **extra: Any):
    return load_run_config(*CONFIGS, overrides(run_dir, cache, **{**ALL_SHARDS, **extra}))


@dataclass
class Taught:
    """The module's cache with cached targets, and the teacher that made them."""

    cache: Path
    teacher_file: Path
    teacher_top1: float

    def live_teacher(self) -> dict[str, Any]:
        """Overrides that load the trained teacher."""
        return {"model__teacher__kwargs": {"width": TEACHER_WIDTH},
                "model__teacher__checkpoint": str(self.teacher_file)}


def no_teacher(base: Path) -> dict[str, Any]:
    """Overrides for a teacher that cannot be built: a run only works if it never builds it."""
    return {"model__teacher__name": "no_such_model", "model__teacher__checkpoint": str(base / "missing_teacher.pt")}


@pytest.fixture(scope="module")
def taught(tmp_path_factory: pytest.TempPathFactory) -> Taught:
    base = tmp_path_factory.mktemp("cached_kd")
    cache = write_tiny_cache(base / "cache", num_shards=NUM_SHARDS, shard_size=SHARD_SIZE)
    # The teacher: a wider cnn_small trained on the labels alone (alpha 0: no teacher of its own).
    teacher_run = base / "teacher_run"
    result = train(cfg(teacher_run, cache, train__epochs=8, train__loss__alpha=0.0, model__student__name="cnn_small",
                       model__student__kwargs={"width": TEACHER_WIDTH}))
    assert result.last_eval["top1"] > 0.9, result.last_eval  # a teacher worth distilling
    # Exported like shardstore.demo._export_student: the student's bare state dict.
    state = load_checkpoint(CheckpointManager(teacher_run).latest())["student"]
    teacher_file = base / "teacher.pt"
    torch.save({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}, teacher_file)
    taught = Taught(cache, teacher_file, result.last_eval["top1"])
    report = fill_teacher_cache(cfg(base / "fill", cache, **taught.live_teacher()), views=VIEWS, topk=TOPK,
                                fsync=False)
    assert sorted(report.shards_filled) == list(range(NUM_SHARDS))
    return taught


class Calls:
    """Counts calls to a function and records what it returned."""

    def __init__(self, fn):
        self.fn, self.returned = fn, []

    def __call__(self, *args, **kwargs):
        out = self.fn(*args, **kwargs)
        self.returned.append(out)
        return out

    @property
    def count(self) -> int:
        return len(self.returned)


@dataclass
class CachedRun:
    result: trainer.TrainResult
    build_teacher: Calls
    load_teacher: Calls


@pytest.fixture(scope="module")
def cached_run(taught: Taught, tmp_path_factory: pytest.TempPathFactory) -> CachedRun:
    """A student taught only by the cached targets (alpha 1: no label term), with an unbuildable teacher."""
    base = tmp_path_factory.mktemp("cached_run")
    with pytest.MonkeyPatch.context() as mp:
        build = Calls(trainer.build_teacher)  # the trainer's own name for it
        load = Calls(kd_teacher.load_teacher)  # what build_teacher calls to load one
        mp.setattr(trainer, "build_teacher", build)
        mp.setattr(kd_teacher, "load_teacher", load)
        result = train(cfg(base / "run", taught.cache, train__epochs=STUDENT_EPOCHS, train__loss__alpha=1.0,
                           data__teacher_targets="teacher", **no_teacher(base)))
    return CachedRun(result, build, load)


# -- 1, 2: cached targets teach, without the teacher, about as well as the live teacher --------------------------------


def test_cached_targets_teach_without_loading_the_teacher(taught: Taught, cached_run: CachedRun,
                                                          tmp_path: Path) -> None:
    # The teacher of that configuration really cannot be built ...
    unbuildable = cfg(tmp_path / "x", taught.cache, **no_teacher(tmp_path))
    with pytest.raises(ConfigError, match="no_such_model"):
        kd_teacher.load_teacher(unbuildable, torch.device("cpu"))
    # ... and the run never tried: build_teacher answered None, load_teacher was never reached.
    assert cached_run.build_teacher.count == 1 and cached_run.build_teacher.returned == [None]
    assert cached_run.load_teacher.count == 0
    result = cached_run.result
    assert result.epochs_done == STUDENT_EPOCHS and result.global_step == STUDENT_EPOCHS * len(TRAIN_SHARDS) * 3
    # Only the KD term trained it (alpha 1), so the accuracy is what the cached targets taught: far above chance.
    assert result.last_eval["top1"] > MIN_TOP1, result.last_eval
    # Evaluated without a teacher: agreement and KL against the held-out shards' stored targets (first view).
    assert result.last_eval["agreement"] > MIN_TOP1 and 0.0 <= result.last_eval["kl"] < 0.5, result.last_eval
    steps = [r for r in read_metrics(result.run_dir) if r["kind"] == "step"]
    assert steps and all("kd" in r and "ce" not in r for r in steps)
    assert steps[-1]["kd"] < steps[0]["kd"] / 2  # the student moved towards the stored targets


def test_cached_student_is_close_to_a_live_taught_one(taught: Taught, cached_run: CachedRun, tmp_path: Path) -> None:
    live = train(cfg(tmp_path / "live", taught.cache, train__epochs=STUDENT_EPOCHS, train__loss__alpha=1.0,
                     **taught.live_teacher()))
    cached_top1, live_top1 = cached_run.result.last_eval["top1"], live.last_eval["top1"]
    why = f"cached {cached_top1:.3f}, live {live_top1:.3f}, teacher {taught.teacher_top1:.3f}"
    assert live.last_eval["teacher_top1"] == pytest.approx(taught.teacher_top1), why  # the same teacher
    assert live.global_step == cached_run.result.global_step, why
    assert cached_top1 >= live_top1 - 0.15, why


# -- 3: shards without the targets -----------------------------------------------------------------------------------


def test_shards_without_targets_are_named_or_skipped(taught: Taught, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(taught.cache, cache)
    spec = read_target_spec(cache, "teacher")
    dropped = [1, 3]
    store = ShardStore.open(cache)
    for shard in dropped:
        entry = store.shards[list(store.shard_ids).index(shard)]
        for name in spec.field_names().values():
            (cache / entry.field_path(name)).unlink()
    build_manifest(cache)

    with pytest.raises(ConfigError) as err:
        train(cfg(tmp_path / "error", cache, data__teacher_targets="teacher", **no_teacher(tmp_path)))
    message = str(err.value)
    assert "missing: 1, 3)" in message, message
    assert f"cover {len(TRAIN_SHARDS) - 2} of the {len(TRAIN_SHARDS)} training shards" in message, message
    assert "shardstore cache-teacher --name teacher" in message and "missing_targets: skip" in message, message
    assert not (tmp_path / "error").exists()  # refused before the run started

    result = train(cfg(tmp_path / "skip", cache, train__epochs=2, data__teacher_targets="teacher",
                       data__missing_targets="skip", **no_teacher(tmp_path)))
    epochs = [r for r in read_metrics(tmp_path / "skip") if r["kind"] == "epoch"]
    assert len(epochs) == 2
    kept = [s for s in TRAIN_SHARDS if s not in dropped]
    for record in epochs:
        assert sorted(record["shards"]) == kept, record["shards"]  # every shard with targets, none without
        assert record["batches"] == len(kept) * SHARD_SIZE // 16
    assert result.global_step == 2 * len(kept) * SHARD_SIZE // 16


# -- 4: a killed cached-mode run resumes bit-identically --------------------------------------------------------------

KILLER = """
import os, signal
from shardstore.config.resolve import load_run_config
from shardstore.kd.trainer import train

class KillAt:
    n = 1
    def epoch_start(self, *a): pass
    def epoch_end(self, *a): pass
    def step(self, epoch, step, values):
        if values and self.n == {kill_at}:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup: like a node failure
        self.n += 1

train(load_run_config(*{configs!r}, {overrides!r}), reporter=KillAt())
"""


def step_losses(run_dir: Path) -> list[tuple[int, float, float, float]]:
    return [(r["global_step"], r["loss"], r["kd"], r["lr"]) for r in read_metrics(run_dir) if r["kind"] == "step"]


@pytest.mark.slow
@pytest.mark.parametrize("hybrid", [False, True], ids=["cached", "hybrid"])
def test_killed_cached_run_resumes_bit_identically(taught: Taught, tmp_path: Path, hybrid: bool) -> None:
    teacher = {"train__loss__live_fraction": 0.5, **taught.live_teacher()} if hybrid else no_teacher(tmp_path)
    common = {**ALL_SHARDS, "train__epochs": 2, "train__max_steps_per_epoch": 8, "train__checkpoint__every_steps": 2,
              "data__teacher_targets": "teacher", **teacher}
    whole = train(load_run_config(*CONFIGS, overrides(tmp_path / "whole", taught.cache, **common)))
    assert whole.global_step == 16

    run_dir = tmp_path / "killed"
    script = KILLER.format(kill_at=11, configs=[str(c) for c in CONFIGS],
                           overrides=overrides(run_dir, taught.cache, **common))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    latest = json.loads((run_dir / "checkpoints" / "latest.json").read_text())
    assert latest["path"] == "recovery.pt" and latest["global_step"] == 10  # inside epoch 1

    resumed = train(load_run_config(*CONFIGS, overrides(run_dir, taught.cache, **common)), resume=True)
    assert resumed.global_step == whole.global_step
    final = json.loads((run_dir / "final_rank0.json").read_text())
    assert final["weights_sha256"] == whole.weights_sha256 == resumed.weights_sha256  # bit-identical student
    assert step_losses(run_dir) == step_losses(tmp_path / "whole")  # the same stored views and targets, in order


# -- 5: hybrid teaching ------------------------------------------------------------------------------------------------


@dataclass
class HybridRun:
    result: trainer.TrainResult
    decisions: list[tuple[int, bool]]
    loads: int
    live_forwards: int
    picks: int


def hybrid_run(monkeypatch: pytest.MonkeyPatch, taught: Taught, run_dir: Path, fraction: float) -> HybridRun:
    decisions: list[tuple[int, bool]] = []
    original = trainer._Run.live_step

    def live_step(self, step: int) -> bool:
        live = original(self, step)
        decisions.append((step, live))
        return live

    load, forward, pick = Calls(kd_teacher.load_teacher), Calls(trainer.teacher_forward), Calls(CachedTargets.pick)
    with monkeypatch.context() as mp:
        mp.setattr(trainer._Run, "live_step", live_step)
        mp.setattr(kd_teacher, "load_teacher", load)
        mp.setattr(trainer, "teacher_forward", forward)
        mp.setattr(CachedTargets, "pick", lambda self, *a, **k: pick(self, *a, **k))
        result = train(cfg(run_dir, taught.cache, train__epochs=2, train__max_steps_per_epoch=8,
                           train__loss__live_fraction=fraction, data__teacher_targets="teacher",
                           **taught.live_teacher()))
    return HybridRun(result, decisions, load.count, forward.count, pick.count)


def test_hybrid_steps_are_taught_live_deterministically(monkeypatch: pytest.MonkeyPatch, taught: Taught,
                                                       tmp_path: Path) -> None:
    half = hybrid_run(monkeypatch, taught, tmp_path / "half", 0.5)
    assert half.loads == 1  # the teacher is loaded for the live steps
    assert len(half.decisions) == half.result.global_step == 16
    live = sum(d for _, d in half.decisions)
    assert 0 < live < len(half.decisions), half.decisions  # some steps live, some from the cache
    assert half.live_forwards == live and half.picks == len(half.decisions) - live
    # Decisions are a function of (seed, step): a second run makes exactly the same ones, and the same student.
    again = hybrid_run(monkeypatch, taught, tmp_path / "again", 0.5)
    assert again.decisions == half.decisions
    assert again.result.weights_sha256 == half.result.weights_sha256

    everything = hybrid_run(monkeypatch, taught, tmp_path / "all", 1.0)
    assert everything.loads == 1 and len(everything.decisions) == 16
    assert all(d for _, d in everything.decisions)
    assert everything.live_forwards == 16 and everything.picks == 0


# -- 6: sparse tail modes ----------------------------------------------------------------------------------------------


def test_renormalised_sparse_tail_trains_without_nan(taught: Taught, tmp_path: Path) -> None:
    first_kd = {}
    for tail in ("renormalise", "spread"):
        run_dir = tmp_path / tail
        result = train(cfg(run_dir, taught.cache, train__epochs=2, train__max_steps_per_epoch=6,
                           train__loss__sparse_tail=tail, data__teacher_targets="teacher", **no_teacher(tmp_path)))
        steps = [r for r in read_metrics(run_dir) if r["kind"] == "step"]
        assert len(steps) == result.global_step == 12
        for r in steps:  # a NaN is logged as null
            for key in ("loss", "kd", "ce"):
                assert r[key] is not None and math.isfinite(r[key]), (tail, r)
        epochs = [r for r in read_metrics(run_dir) if r["kind"] == "epoch"]
        assert all(r["train_loss"] is not None and math.isfinite(r["train_loss"]) for r in epochs)
        assert all(torch.isfinite(p).all() for p in load_checkpoint(CheckpointManager(run_dir).latest())
                   ["student"].values() if p.is_floating_point())
        first_kd[tail] = steps[0]["kd"]
    # The same student, views and step: only the rebuilt teacher distribution differs, so the KD term does.
    assert first_kd["renormalise"] != pytest.approx(first_kd["spread"], rel=1e-3), first_kd


# -- 7: configuration errors -------------------------------------------------------------------------------------------


def test_config_errors_are_single_clear_messages(taught: Taught, tmp_path: Path) -> None:
    cases = [
        ({"data__teacher_targets": "nope"}, ["no teacher targets named 'nope'", "groups: teacher",
                                            "shardstore cache-teacher --name nope"]),
        ({"data__teacher_targets": "teacher", "train__loss__feature_loss": "cosine",
          "train__loss__feature_weight": 0.5}, ["feature_loss needs teacher embeddings", "'teacher' have none",
                                                "--embeddings"]),
        ({"data__teacher_targets": "teacher", "model__num_classes": 12}, ["'teacher' have 10 classes",
                                                                          "num_classes is 12"]),
    ]
    for i, (extra, parts) in enumerate(cases):
        run_dir = tmp_path / f"run{i}"
        with pytest.raises(ConfigError) as err:
            train(cfg(run_dir, taught.cache, **no_teacher(tmp_path), **extra))
        message = str(err.value)
        assert "\n" not in message and all(p in message for p in parts), message
        assert not run_dir.exists()  # nothing was trained or written


# -- initialisation ----------------------------------------------------------------------------------------------------


def test_loading_the_teacher_does_not_change_the_students_initial_weights(monkeypatch: pytest.MonkeyPatch,
                                                                          taught: Taught, tmp_path: Path) -> None:
    initial: dict[str, str] = {}
    original = trainer.build_student

    def build_student(c):
        student = original(c)
        initial[str(c.train.loss.live_fraction)] = trainer.weights_digest(student)
        return student

    monkeypatch.setattr(trainer, "build_student", build_student)
    for fraction in (0.0, 0.5):
        train(cfg(tmp_path / str(fraction), taught.cache, train__epochs=1, train__max_steps_per_epoch=1,
                  train__loss__live_fraction=fraction, data__teacher_targets="teacher", **taught.live_teacher()))
    assert len(initial) == 2
    # train.seed alone decides the student's initialisation, whether or not the teacher is loaded
    assert initial["0.0"] == initial["0.5"]


def test_evaluation_against_stored_targets_replays_the_stored_view(taught: Taught) -> None:
    """The teacher evaluated as the student against its own stored targets agrees everywhere, KL ~ 0."""
    run_cfg = cfg(taught.cache.parent / "unused", taught.cache, data__teacher_targets="teacher",
                  **taught.live_teacher())
    data = build_data(run_cfg, distributed.DistInfo(0, 1, 0, torch.device("cpu")))
    assert data.eval_has_targets and data.eval_store is not None
    teacher = kd_teacher.load_teacher(run_cfg, torch.device("cpu"))
    cached = CachedTargets(read_target_spec(taught.cache, "teacher"), 0, temperature=2.0, tail="spread")
    m = evaluate(teacher, None, data.eval_store, image_field="images", label_field="labels", size=16,
                 batch_size=32, device=torch.device("cpu"), cached=cached)
    assert m["agreement"] == 1.0 and m["kl"] < 0.05, m  # only top-5 spread and float16 rounding remain
    # Replaying another view than the stored one's breaks it: shift view 0 by a column.
    real_take = cached.take

    def shifted(batch, which, temperature):
        picked = real_take(batch, which, temperature)
        picked.views[:, 1] = (picked.views[:, 1] + 3).clamp(max=16 - picked.views[:, 3])
        picked.views[:, 4] = 1 - picked.views[:, 4]
        return picked

    cached.take = shifted  # type: ignore[method-assign]
    worse = evaluate(teacher, None, data.eval_store, image_field="images", label_field="labels", size=16,
                     batch_size=32, device=torch.device("cpu"), cached=cached)
    assert worse["kl"] > 2 * m["kl"] + 0.01, (m, worse)
