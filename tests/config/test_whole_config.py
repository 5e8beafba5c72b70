"""The three config files are checked whole: every problem in one ConfigError, one complete line each."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from shardstore.cli import main
from shardstore.config.resolve import load_run_config, run_config_from_yaml
from shardstore.errors import ConfigError

# A config ported from another project: two keys of its own in each file.
FOREIGN = {
    "data": "cache_root: cache\ndata_path: /data/x\nnum_workers: 8\n",
    "train": "epochs: 2\nlearning_rate: 0.1\nlog_every: 5\n",
    "model": "num_classes: 10\narch: resnet18\npretrained: true\n",
}


def write_configs(folder: Path, **texts: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, file in (("data", "data_config.yaml"), ("train", "train_config_kd.yaml"),
                       ("model", "model_config_kd.yaml")):
        path = folder / file
        path.write_text(texts.get(name, FOREIGN[name]))
        paths.append(path)
    return paths


def expected_foreign(paths: list[Path]) -> list[str]:
    data, train, model = paths
    return [
        f"unknown key `data_path` in {data}; ",
        f"unknown key `num_workers` in {data}; valid keys: ",
        f"unknown key `learning_rate` in {train}; ",
        f"unknown key `log_every` in {train}; ",
        f"unknown key `arch` in {model}; ",
        f"unknown key `pretrained` in {model}; ",
    ]


def test_six_foreign_keys_are_reported_at_once(tmp_path: Path) -> None:
    paths = write_configs(tmp_path)
    with pytest.raises(ConfigError) as caught:
        load_run_config(*paths)
    problems = caught.value.problems
    assert len(problems) == 6 and str(caught.value) == "\n".join(problems)
    for line, start in zip(problems, expected_foreign(paths)):
        assert line.startswith(start) and "\n" not in line, (line, start)


def test_the_cli_prints_one_line_per_problem(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    paths = write_configs(tmp_path)
    code = main(["train", "--data-config", str(paths[0]), "--train-config", str(paths[1]),
                 "--model-config", str(paths[2])])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 6 and "Traceback" not in "".join(err)
    for line, start in zip(err, expected_foreign(paths)):
        assert line.startswith(f"shardstore: error: {start}"), line


def test_bad_values_of_a_file_come_together(tmp_path: Path) -> None:
    paths = write_configs(tmp_path, data="cache_root: c\nloader_threads: 0\nrandom_subset_seed: -1\n",
                          train="epochs: 0\nlr: -1\nloss:\n  alpha: 2\n  temperature: 0\n",
                          model="num_classes: 1\n")
    with pytest.raises(ConfigError) as caught:
        load_run_config(*paths)
    data, train, model = paths
    assert list(caught.value.problems) == [
        f"{data}: `loader_threads` must be at least 1, got 0",
        f"{data}: `random_subset_seed` must be non-negative, got -1",
        f"{train}: `loss.alpha` must be between 0 and 1 (the weight of the KD term), got 2.0",
        f"{train}: `loss.temperature` must be positive, got 0.0; e.g. 4.0",
        f"{train}: `epochs` must be at least 1, got 0",
        f"{train}: `lr` must be positive, got -1.0; e.g. 0.001",
        f"{model}: `num_classes` must be at least 2, got 1",
    ]


def test_wrong_types_missing_keys_and_overrides_come_together(tmp_path: Path) -> None:
    paths = write_configs(tmp_path, data="shards_per_epoch: many\n", train="epochs: 2.5\nloss:\n  alhpa: 1\n",
                          model="teacher:\n  name: resnet20\n")
    with pytest.raises(ConfigError) as caught:
        load_run_config(*paths, overrides=["train.epochs", "modle.x=1"])
    text = str(caught.value)
    for part in ("--set `train.epochs`: expected SECTION.KEY=VALUE", "--set `modle.x=1`: unknown section `modle`",
                 "`cache_root` is missing", "`shards_per_epoch` must be int or null, got 'many'",
                 "`epochs` must be int, got 2.5", "unknown key `loss.alhpa`", "`num_classes` is missing"):
        assert len(re.findall(re.escape(part), text)) == 1, (part, text)
    assert len(caught.value.problems) == 7


def test_one_problem_is_still_one_line(tmp_path: Path) -> None:
    paths = write_configs(tmp_path, data="cache_root: c\n", train="epochs: 2\n", model="num_classes: 10\nzzz: 1\n")
    with pytest.raises(ConfigError, match=rf"^unknown key `zzz` in {re.escape(str(paths[2]))}; valid keys: [^\n]*$"):
        load_run_config(*paths)


def test_a_run_config_yaml_is_checked_whole_too() -> None:
    text = "data:\n  cache_root: c\n  shard_size: 4\ntrain:\n  epoch: 3\nmodel:\n  num_classes: 0\n"
    with pytest.raises(ConfigError) as caught:
        run_config_from_yaml(text, "config.yaml")
    assert [p.split(";")[0] for p in caught.value.problems] == [
        "unknown key `shard_size` in config.yaml (data)", "unknown key `train.epoch` in config.yaml",
        "config.yaml: `model.num_classes` must be at least 2, got 0"]


def test_a_default_standing_in_for_a_wrong_value_adds_no_line(tmp_path: Path) -> None:
    # feature_loss is wrong: __post_init__ runs with its default (none), whose complaint about feature_weight
    # would be about the stand-in, not the user's file.
    paths = write_configs(tmp_path, data="cache_root: c\n", model="num_classes: 10\n",
                          train="loss:\n  feature_loss: cosin\n  feature_weight: 0.5\nepochs: 0\n")
    with pytest.raises(ConfigError) as caught:
        load_run_config(*paths)
    assert [p.split(": ", 1)[1] for p in caught.value.problems] == [
        "`loss.feature_loss` must be one of none, cosine, smooth_l1, mse, got 'cosin'; did you mean `cosine`?",
        "`epochs` must be at least 1, got 0"]
