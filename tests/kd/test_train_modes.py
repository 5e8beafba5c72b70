"""Training modes: feature distillation, targets read from the cache, SGD with channels-last; plot; CLI errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shardstore import ShardWriter, build_manifest
from shardstore.cli import main
from shardstore.config.resolve import DEFAULT_DATA_CONFIG, DEFAULT_MODEL_CONFIG, DEFAULT_TRAIN_CONFIG, load_run_config
from shardstore.errors import ConfigError
from shardstore.kd.checkpoint import CheckpointManager, load_checkpoint
from shardstore.kd.metrics import read_metrics
from shardstore.kd.trainer import train

from .conftest import overrides

CONFIGS = [DEFAULT_DATA_CONFIG, DEFAULT_TRAIN_CONFIG, DEFAULT_MODEL_CONFIG]


def test_feature_distillation_trains_and_saves_the_projector(tiny_cache: Path, tmp_path: Path) -> None:
    cfg = load_run_config(*CONFIGS, overrides(tmp_path / "run", tiny_cache, train__epochs=1,
                                              train__loss__feature_loss="cosine", train__loss__feature_weight=0.5))
    train(cfg)
    steps = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "step"]
    assert steps and all({"kd", "ce", "feature"} <= set(r) for r in steps)
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "epoch_0000.pt")
    assert any(k.startswith("projector.") for k in state["criterion"])


def test_targets_from_the_cache_never_load_the_teacher(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n = 6 * 32
    labels = rng.integers(0, 10, n)
    logits = np.eye(10, dtype=np.float32)[labels] * 6.0  # a confident "teacher" that is always right
    images = rng.integers(0, 255, (n, 3, 16, 16)).astype(np.uint8)
    root = tmp_path / "cache"
    with ShardWriter(root, 32, fsync=False) as w:
        w.add_batch({"images": images, "labels": labels.astype(np.int64), "teacher_logits": logits})
    build_manifest(root)

    # A teacher that cannot be built: the run only works if it is never built.
    cfg = load_run_config(*CONFIGS, overrides(tmp_path / "run", root, train__epochs=1,
                                              model__teacher__name="no_such_model",
                                              train__loss__target_field="teacher_logits"))
    result = train(cfg)
    assert result.global_step > 0 and result.last_eval["teacher_top1"] == 1.0  # the cached logits are the teacher


def test_sgd_channels_last_and_missing_fields(tiny_cache: Path, tmp_path: Path) -> None:
    from shardstore import ConfigError

    cfg = load_run_config(*CONFIGS, overrides(tmp_path / "run", tiny_cache, train__epochs=1, train__optimizer="sgd",
                                              train__channels_last=True, train__grad_clip=None))
    assert train(cfg).global_step > 0
    bad = load_run_config(*CONFIGS, overrides(tmp_path / "bad", tiny_cache, train__loss__target_field="logits"))
    with pytest.raises(ConfigError, match="has no field 'logits'"):
        train(bad)


@pytest.mark.slow
def test_plot_and_cli_errors(tiny_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sets = [a for o in overrides(tmp_path / "run", tiny_cache, train__epochs=1) for a in ("--set", o)]
    assert main(["train", *sets]) == 0
    out = capsys.readouterr().out
    assert "resolved configuration:" in out and "epoch 1 done" in out
    assert (tmp_path / "run" / "config.yaml").exists()
    assert main(["plot", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    assert main(["train", *sets, "--set", "train.loss.alhpa=0.3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did you mean `loss.alpha`?" in err[0]
    assert main(["train", "--data_config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err
    assert main(["plot", str(tmp_path)]) == 2


def test_tensorboard_scalars_when_installed(tiny_cache: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    cfg = load_run_config(*CONFIGS, overrides(tmp_path / "run", tiny_cache, train__epochs=1,
                                              train__log__tensorboard=True))
    train(cfg)
    events = list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 100


def test_a_fresh_run_into_a_used_run_dir_is_refused(tiny_cache: Path, tmp_path: Path) -> None:
    cfg = load_run_config(DEFAULT_DATA_CONFIG, DEFAULT_TRAIN_CONFIG, DEFAULT_MODEL_CONFIG,
                          overrides(tmp_path / "run", tiny_cache, train__epochs=1))
    train(cfg)
    before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    with pytest.raises(ConfigError, match="--resume"):
        train(cfg)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == before  # nothing lost


def test_an_earlier_epoch_checkpoint_is_never_pruned_by_later_stale_ones(tmp_path: Path) -> None:
    # A run resumed from an old checkpoint writes epoch 0 next to stale epochs 9-11 of its abandoned future.
    manager = CheckpointManager(tmp_path, keep_last=3)
    manager.dir.mkdir(parents=True)
    for epoch in (9, 10, 11):
        (manager.dir / f"epoch_{epoch:04d}.pt").write_bytes(b"stale")
    path = manager.save_epoch({"global_step": 1, "student": {}}, 0, is_best=False)
    assert path.exists() and manager.latest() == path
    assert load_checkpoint(path)["global_step"] == 1


def test_two_sources_of_cached_teacher_outputs_are_refused(tiny_cache: Path, tmp_path: Path) -> None:
    cfg = load_run_config(DEFAULT_DATA_CONFIG, DEFAULT_TRAIN_CONFIG, DEFAULT_MODEL_CONFIG,
                          overrides(tmp_path / "run", tiny_cache, train__loss__target_field="logits",
                                    data__teacher_targets="teacher"))
    with pytest.raises(ConfigError, match="keep one"):
        train(cfg)
