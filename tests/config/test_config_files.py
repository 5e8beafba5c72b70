"""Each YAML file read alone: the values it holds as is, before ``load_run_config`` resolves paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from shardstore.config.model import load_model_config
from shardstore.config.resolve import DEFAULT_DATA_CONFIG, DEFAULT_MODEL_CONFIG, DEFAULT_TRAIN_CONFIG, load_run_config
from shardstore.config.train import load_train_config
from shardstore.errors import ConfigError


def test_the_train_and_model_files_read_alone_hold_what_the_run_config_holds() -> None:
    run = load_run_config(DEFAULT_DATA_CONFIG, DEFAULT_TRAIN_CONFIG, DEFAULT_MODEL_CONFIG)
    train, model = load_train_config(DEFAULT_TRAIN_CONFIG), load_model_config(DEFAULT_MODEL_CONFIG)
    assert (train.seed, train.batch_size, train.loss) == (run.train.seed, run.train.batch_size, run.train.loss)
    assert (model.num_classes, model.student, model.teacher.name) == (run.model.num_classes, run.model.student,
                                                                      run.model.teacher.name)


def test_a_bad_key_in_a_file_read_alone_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "train.yaml"
    bad.write_text("batch_sise: 8\n")
    with pytest.raises(ConfigError, match=r"unknown key `batch_sise` in .*train\.yaml; did you mean `batch_size`"):
        load_train_config(bad)
