"""train/model configs: the shipped files, round trips, every kind of error message, overrides, path resolution."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from shardstore.config.data import DataConfig
from shardstore.config.model import InputConfig, ModelConfig, StudentConfig, TeacherConfig
from shardstore.config.overrides import apply_overrides
from shardstore.config.resolve import (
    DEFAULT_CONFIG_DIR,
    DEFAULT_DATA_CONFIG,
    DEFAULT_MODEL_CONFIG,
    DEFAULT_TRAIN_CONFIG,
    RunConfig,
    load_run_config,
    run_config_from_yaml,
    run_config_to_yaml,
)
from shardstore.config.schema import from_mapping, load_yaml, to_dict
from shardstore.config.train import AugmentConfig, EvalConfig, LossConfig, TrainConfig
from shardstore.errors import ConfigError

TRAIN = "train_config_kd.yaml"
MODEL = "model_config_kd.yaml"


def exactly(message: str) -> str:
    return "^" + re.escape(message) + "$"


def write_configs(folder: Path, data: str = "cache_root: cache\n", train: str = "", model: str = "num_classes: 10\n",
                  ) -> tuple[Path, Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "data_config.yaml", folder / TRAIN, folder / MODEL
    for path, text in zip(paths, (data, train, model)):
        path.write_text(text)
    return paths


def flat_keys(mapping: dict[str, Any], prefix: str = "") -> set[str]:
    out = set()
    for key, value in mapping.items():
        # `kwargs` is a free mapping of constructor arguments, not a section of known keys.
        if isinstance(value, dict) and key != "kwargs":
            out |= flat_keys(value, f"{prefix}{key}.")
        else:
            out.add(prefix + key)
    return out


# --- the shipped files -------------------------------------------------------------------------------------------


def test_shipped_configs_load_with_the_demo_settings() -> None:
    cfg = load_run_config(DEFAULT_DATA_CONFIG, DEFAULT_TRAIN_CONFIG, DEFAULT_MODEL_CONFIG)
    assert DEFAULT_CONFIG_DIR == Path(__file__).resolve().parents[2] / "configs"
    assert (cfg.model.num_classes, cfg.model.teacher.name, cfg.model.student.name) == (10, "resnet20", "cnn_small")
    for net in (cfg.model.teacher, cfg.model.student):
        assert net.input == InputConfig(size=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert (cfg.train.batch_size, cfg.train.lr, cfg.train.eval.held_out_shards) == (64, 0.005, 2)
    assert cfg.model.teacher.checkpoint == str((DEFAULT_CONFIG_DIR / "../shardstore-demo/teacher.pt").resolve()) or \
        cfg.model.teacher.checkpoint.endswith("shardstore-demo/teacher.pt")
    assert cfg.data.cache_root == str(DEFAULT_CONFIG_DIR / "../shardstore-demo/cache")


@pytest.mark.parametrize("path", [DEFAULT_DATA_CONFIG, DEFAULT_TRAIN_CONFIG, DEFAULT_MODEL_CONFIG],
                         ids=lambda p: p.name)
def test_shipped_files_write_every_key_with_a_comment(path: Path) -> None:
    cfg = load_run_config(DEFAULT_DATA_CONFIG, DEFAULT_TRAIN_CONFIG, DEFAULT_MODEL_CONFIG)
    section = {"data_config.yaml": cfg.data, TRAIN: cfg.train, MODEL: cfg.model}[path.name]
    assert flat_keys(load_yaml(path)) == flat_keys(to_dict(section))
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            assert " # " in line, f"{path.name}: no comment on {line!r}"


def test_dataclass_defaults_are_the_documented_ones() -> None:
    train, model = TrainConfig(), ModelConfig(num_classes=1000)
    assert (train.run_dir, train.lr, train.base_batch_size, train.max_steps_per_epoch, train.amp) == \
        ("runs/kd", 1e-3, 256, 500, "auto")
    assert train.augment == AugmentConfig(scale=(0.35, 1.0), ratio=(0.75, 1.3333333))
    assert (model.teacher.name, model.student.name, model.teacher.input.size) == ("resnet50", "resnet18", 224)
    assert model.student.input.mean == (0.485, 0.456, 0.406) and model.student.kwargs == {}


# --- round trips ---------------------------------------------------------------------------------------------------

CHANGED_TRAIN = TrainConfig(lr=3e-4, optimizer="sgd", grad_clip=None, ema_decay=0.999,
                            loss=LossConfig(alpha=0.9, feature_loss="cosine", feature_weight=2.0,
                                            target_field="logits"),
                            augment=AugmentConfig(scale=(0.2, 0.8)), eval=EvalConfig(cache_root="/ev", max_batches=3))
CHANGED_MODEL = ModelConfig(num_classes=7,
                            teacher=TeacherConfig(name="timm:vit_tiny", checkpoint="/t.pt", dtype="bfloat16"),
                            student=StudentConfig(kwargs={"width": 2, "drop": [0.1, 0.2]}, input=InputConfig(size=64)))


@pytest.mark.parametrize("cfg", [TrainConfig(), CHANGED_TRAIN, ModelConfig(num_classes=3), CHANGED_MODEL,
                                 DataConfig(cache_root="/c", shards_per_epoch=None)], ids=lambda c: type(c).__name__)
def test_to_dict_then_from_mapping_is_the_same_object(cfg: Any) -> None:
    plain = to_dict(cfg)
    assert yaml.safe_load(yaml.safe_dump(plain)) == plain  # plain data only: safe_dump refuses tuples and objects
    assert from_mapping(type(cfg), plain, "x.yaml") == cfg


def test_run_config_yaml_reads_back_to_the_same_objects(tmp_path: Path) -> None:
    cfg = load_run_config(*write_configs(tmp_path), overrides=["train.loss.alpha=0.25", "model.student.kwargs.width=3"])
    text = run_config_to_yaml(cfg)
    sections = yaml.safe_load(text)
    assert list(sections) == ["data", "train", "model"]
    assert "scale: [0.35, 1.0]" in text and "  loss:\n    alpha: 0.25\n" in text
    assert from_mapping(TrainConfig, sections["train"], "run.yaml") == cfg.train
    assert from_mapping(ModelConfig, sections["model"], "run.yaml") == cfg.model
    assert run_config_from_yaml(text) == cfg
    assert isinstance(cfg, RunConfig) and cfg.model.student.kwargs == {"width": 3}


def test_run_config_from_yaml_errors() -> None:
    text = run_config_to_yaml(RunConfig(data=DataConfig(cache_root="/c"), train=TrainConfig(),
                                        model=ModelConfig(num_classes=4)))
    with pytest.raises(ConfigError, match=exactly("section `model` is missing in run.yaml; write the whole file with "
                                                  "run_config_to_yaml")):
        run_config_from_yaml(text.split("model:")[0], "run.yaml")
    with pytest.raises(ConfigError, match=exactly("unknown key `train.loss.alhpa` in run.yaml; did you mean "
                                                  "`train.loss.alpha`?")):
        run_config_from_yaml(text.replace("alpha:", "alhpa:"), "run.yaml")


# --- error messages ------------------------------------------------------------------------------------------------

TRAIN_ERRORS = [
    ({"epoch": 3}, "unknown key `epoch` in train_config_kd.yaml; did you mean `epochs`?"),
    ({"loss": {"alhpa": 0.9}}, "unknown key `loss.alhpa` in train_config_kd.yaml; did you mean `loss.alpha`?"),
    ({"temperature": 2.0}, "unknown key `temperature` in train_config_kd.yaml; did you mean `loss.temperature`?"),
    ({"every_steps": 5}, "unknown key `every_steps` in train_config_kd.yaml; did you mean `checkpoint.every_steps` "
                         "or `log.every_steps`?"),
    ({"zzzz": 1}, "unknown key `zzzz` in train_config_kd.yaml; valid keys: run_dir, seed, epochs, batch_size, "
                  "max_steps_per_epoch, optimizer, lr, base_batch_size, weight_decay, momentum, warmup_steps, "
                  "min_lr_ratio, grad_clip, accumulation_steps, amp, compile, channels_last, ema_decay, threads, loss, "
                  "augment, eval, checkpoint, log, preempt_signals"),
    ({"log": {"zzzz": 1}}, "unknown key `log.zzzz` in train_config_kd.yaml; valid keys in `log`: every_steps, "
     "tensorboard, progress_every_s"),
    ({"epochs": True}, "train_config_kd.yaml: `epochs` must be int, got True"),
    ({"epochs": 2.0}, "train_config_kd.yaml: `epochs` must be int, got 2.0"),
    ({"lr": "fast"}, "train_config_kd.yaml: `lr` must be float, got 'fast'"),
    ({"lr": True}, "train_config_kd.yaml: `lr` must be float, got True"),
    ({"compile": 1}, "train_config_kd.yaml: `compile` must be bool, got 1"),
    ({"max_steps_per_epoch": 1.5}, "train_config_kd.yaml: `max_steps_per_epoch` must be int or null, got 1.5"),
    ({"grad_clip": "x"}, "train_config_kd.yaml: `grad_clip` must be float or null, got 'x'"),
    ({"run_dir": None}, "train_config_kd.yaml: `run_dir` must be str, got None"),
    ({"optimizer": "adam"}, "train_config_kd.yaml: `optimizer` must be one of adamw, sgd, got 'adam'; "
                            "did you mean `adamw`?"),
    ({"optimizer": "lbfgs"}, "train_config_kd.yaml: `optimizer` must be one of adamw, sgd, got 'lbfgs'"),
    ({"amp": False}, "train_config_kd.yaml: `amp` must be one of auto, bf16, off, got False; quote it (\"off\"): "
                     "YAML reads off as false"),
    ({"loss": {"feature_loss": "cosin"}}, "train_config_kd.yaml: `loss.feature_loss` must be one of none, cosine, "
                                          "smooth_l1, mse, got 'cosin'; did you mean `cosine`?"),
    ({"checkpoint": {"best_metric": "top_1"}}, "train_config_kd.yaml: `checkpoint.best_metric` must be one of top1, "
                                               "agreement, loss, got 'top_1'; did you mean `top1`?"),
    ({"augment": {"scale": [0.5]}}, "train_config_kd.yaml: `augment.scale` must be a list of 2 floats, got [0.5]"),
    ({"augment": {"scale": 0.5}}, "train_config_kd.yaml: `augment.scale` must be a list of 2 floats, got 0.5"),
    ({"augment": {"ratio": [0.5, "wide"]}}, "train_config_kd.yaml: `augment.ratio[1]` must be float, got 'wide'"),
    ({"loss": None}, "train_config_kd.yaml: `loss` must be a mapping of keys to values, got None; leave the key out "
                     "to keep the defaults"),
    ({"eval": [1]}, "train_config_kd.yaml: `eval` must be a mapping of keys to values, got [1]"),
    # __post_init__ checks, with the section put before the key
    ({"epochs": 0}, "train_config_kd.yaml: `epochs` must be at least 1, got 0"),
    ({"seed": -1}, "train_config_kd.yaml: `seed` must be non-negative, got -1"),
    ({"max_steps_per_epoch": 0}, "train_config_kd.yaml: `max_steps_per_epoch` must be at least 1, got 0"),
    ({"lr": 0}, "train_config_kd.yaml: `lr` must be positive, got 0.0; e.g. 0.001"),
    ({"momentum": 1}, "train_config_kd.yaml: `momentum` must be at least 0 and below 1, got 1.0; e.g. 0.9"),
    ({"min_lr_ratio": 2}, "train_config_kd.yaml: `min_lr_ratio` must be between 0 and 1 (a fraction of the peak lr), "
                          "got 2.0"),
    ({"grad_clip": 0}, "train_config_kd.yaml: `grad_clip` must be positive, got 0.0; e.g. 1.0 "
                       "(or null for no clipping)"),
    ({"ema_decay": 1}, "train_config_kd.yaml: `ema_decay` must be above 0 and below 1, got 1.0; e.g. 0.999, "
                       "or null for no EMA"),
    ({"run_dir": " "}, "train_config_kd.yaml: `run_dir` is empty; name the directory the run writes to, e.g. runs/kd"),
    ({"loss": {"alpha": 1.5}}, "train_config_kd.yaml: `loss.alpha` must be between 0 and 1 (the weight of the KD "
                               "term), got 1.5"),
    ({"loss": {"temperature": 0}}, "train_config_kd.yaml: `loss.temperature` must be positive, got 0.0; e.g. 4.0"),
    ({"loss": {"feature_weight": 1}}, "train_config_kd.yaml: `loss.feature_weight` is 1.0 but `loss.feature_loss` is "
                                      "none; set feature_loss to cosine, smooth_l1 or mse, or feature_weight to 0"),
    ({"loss": {"feature_loss": "mse"}}, "train_config_kd.yaml: `loss.feature_loss` is mse but `loss.feature_weight` "
                                        "is 0; set feature_weight above 0 (e.g. 1.0) or feature_loss to none"),
    ({"augment": {"scale": [0.9, 0.3]}}, "train_config_kd.yaml: `augment.scale` must be [low, high] with 0 < low <= "
                                         "high <= 1, got [0.9, 0.3]; e.g. [0.35, 1.0]"),
    ({"augment": {"ratio": [0, 1]}}, "train_config_kd.yaml: `augment.ratio` must be [low, high] with 0 < low <= high, "
                                     "got [0.0, 1.0]; e.g. [0.75, 1.3333333]"),
    ({"eval": {"held_out_shards": -1}}, "train_config_kd.yaml: `eval.held_out_shards` must be non-negative, got -1"),
    ({"eval": {"held_out_shards": 2, "cache_root": "ev"}}, "train_config_kd.yaml: `eval.held_out_shards` is 2 and "
                                                           "`eval.cache_root` is set; evaluate on one: set "
                                                           "held_out_shards to 0 or cache_root to null"),
    ({"eval": {"batch_size": 0}}, "train_config_kd.yaml: `eval.batch_size` must be at least 1, got 0"),
    ({"checkpoint": {"keep_last": 0}}, "train_config_kd.yaml: `checkpoint.keep_last` must be at least 1, got 0"),
    ({"log": {"every_steps": 0}}, "train_config_kd.yaml: `log.every_steps` must be at least 1, got 0"),
]


@pytest.mark.parametrize(("values", "message"), TRAIN_ERRORS, ids=[m.split(": ", 1)[-1][:40] for _, m in TRAIN_ERRORS])
def test_train_config_errors(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=exactly(message)):
        from_mapping(TrainConfig, values, TRAIN)


MODEL_ERRORS = [
    ({}, "`num_classes` is missing in model_config_kd.yaml; set it to the number of classes the networks predict, "
         "e.g. 10"),
    ({"num_classes": "ten"}, "model_config_kd.yaml: `num_classes` must be int, got 'ten'"),
    ({"num_classes": 1}, "model_config_kd.yaml: `num_classes` must be at least 2, got 1"),
    ({"student": {"nmae": "x"}}, "unknown key `student.nmae` in model_config_kd.yaml; did you mean `student.name`?"),
    ({"student": {"input": {"szie": 32}}}, "unknown key `student.input.szie` in model_config_kd.yaml; "
                                           "did you mean `student.input.size`?"),
    ({"student": {"checkpoint_format": "torchscript"}}, "unknown key `student.checkpoint_format` in "
                                                        "model_config_kd.yaml; did you mean `student.checkpoint`?"),
    ({"student": {"input": {"mean": [0.5, 0.5]}}}, "model_config_kd.yaml: `student.input.mean` has 2 values and "
                                                   "`student.input.std` 3; give one of each per input channel, e.g. "
                                                   "[0.485, 0.456, 0.406] and [0.229, 0.224, 0.225]"),
    ({"student": {"input": {"std": [0.5, 0, 0.5]}}}, "model_config_kd.yaml: `student.input.std` must be "
                                                     "positive numbers, got [0.5, 0.0, 0.5]; "
                                                     "e.g. [0.229, 0.224, 0.225]"),
    ({"teacher": {"input": {"size": 0}}}, "model_config_kd.yaml: `teacher.input.size` must be at least 1, got 0"),
    ({"student": {"kwargs": [1]}}, "model_config_kd.yaml: `student.kwargs` must be a mapping of keys to values, "
                                   "got [1]"),
    ({"student": {"name": "timm:"}}, "model_config_kd.yaml: `student.name` is 'timm:'; name a registered network "
                                     "(e.g. resnet18) or timm:<name>"),
    ({"teacher": {"dtype": "bfloat"}}, "model_config_kd.yaml: `teacher.dtype` must be one of float32, bfloat16, got "
                                       "'bfloat'; did you mean `bfloat16`?"),
    ({"teacher": {"checkpoint_format": "torchscript"}}, "model_config_kd.yaml: `teacher.checkpoint_format` is "
                                                        "torchscript but `teacher.checkpoint` is null; set checkpoint "
                                                        "to the TorchScript file"),
    ({"teacher": {"checkpoint": ""}}, "model_config_kd.yaml: `teacher.checkpoint` is empty; give the weights file or "
                                      "set it to null"),
]


@pytest.mark.parametrize(("values", "message"), MODEL_ERRORS, ids=[m.split(": ", 1)[-1][:40] for _, m in MODEL_ERRORS])
def test_model_config_errors(values: dict, message: str) -> None:
    values = {"num_classes": 10, **values} if values else {}
    with pytest.raises(ConfigError, match=exactly(message)):
        from_mapping(ModelConfig, values, MODEL)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Needs:
    count: int
    """A required key with no written fix."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Outer:
    inner: _Needs = dataclasses.field(default_factory=lambda: _Needs(count=1))
    """A section with a required key."""
    weights: list[float] = dataclasses.field(default_factory=list)
    """A variable-length list."""


def test_missing_keys_without_a_written_fix_name_the_type() -> None:
    with pytest.raises(ConfigError, match=exactly("`count` is missing in x.yaml; set it to an int")):
        from_mapping(_Needs, {}, "x.yaml")
    with pytest.raises(ConfigError, match=exactly("`inner.count` is missing in x.yaml; set it to an int")):
        from_mapping(_Outer, {"inner": {}}, "x.yaml")
    with pytest.raises(ConfigError, match=exactly("x.yaml: `weights[2]` must be float, got None")):
        from_mapping(_Outer, {"weights": [1, 2.5, None]}, "x.yaml")
    assert from_mapping(_Outer, {"weights": [1, "2e-1"]}, "x.yaml").weights == [1.0, 0.2]


def test_values_are_converted_to_the_annotated_types() -> None:
    cfg = from_mapping(TrainConfig, {"lr": 1, "weight_decay": "5e-2", "augment": {"scale": [1, 1]}}, TRAIN)
    assert type(cfg.lr) is float and cfg.lr == 1.0
    assert cfg.weight_decay == 0.05  # PyYAML reads 5e-2 (no dot) as a string
    assert cfg.augment.scale == (1.0, 1.0) and isinstance(cfg.augment.scale, tuple)
    assert from_mapping(TrainConfig, {"max_steps_per_epoch": None}, TRAIN).max_steps_per_epoch is None


def test_post_init_checks_apply_to_direct_construction() -> None:
    with pytest.raises(ValueError,
                       match=exactly("`alpha` must be between 0 and 1 (the weight of the KD term), got -0.1")):
        LossConfig(alpha=-0.1)
    with pytest.raises(TypeError):
        TrainConfig(10)  # keyword-only
    with pytest.raises(dataclasses.FrozenInstanceError):
        TrainConfig().lr = 1.0  # type: ignore[misc]


# --- load_yaml -----------------------------------------------------------------------------------------------------


def test_load_yaml_errors(tmp_path: Path) -> None:
    path = tmp_path / TRAIN
    with pytest.raises(ConfigError, match=exactly(f"{path}: no such file; pass --train-config PATH")):
        load_yaml(path, option="--train-config")
    path.write_text("lr: [unclosed\n")
    with pytest.raises(ConfigError, match=f"^{re.escape(str(path))}: not valid YAML \\(.*line 1.*\\)$"):
        load_yaml(path)
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match=exactly(f"{path}: expected a mapping of keys to values, got list")):
        load_yaml(path)
    with pytest.raises(ConfigError, match=exactly(f"{tmp_path}: cannot be read (Is a directory); pass --config PATH")):
        load_yaml(tmp_path)
    path.write_text("# every key at its default\n")
    assert load_yaml(path) == {}


# --- overrides -----------------------------------------------------------------------------------------------------


def test_override_values_are_read_as_yaml() -> None:
    sections: dict[str, dict] = {"data": {"cache_root": "c"}, "train": {"loss": {"temperature": 2.0}}, "model": {}}
    apply_overrides(sections, ["data.shards_per_epoch=8", "train.lr=3e-4", "train.compile=true",
                               "train.loss.alpha=0.9", "train.eval.cache_root=null", "train.augment.scale=[0.2, 1.0]",
                               "model.student.name=resnet8", " model.student.kwargs.note = a=b"])
    assert sections == {
        "data": {"cache_root": "c", "shards_per_epoch": 8},
        "train": {"lr": "3e-4", "compile": True, "loss": {"temperature": 2.0, "alpha": 0.9},
                  "eval": {"cache_root": None}, "augment": {"scale": [0.2, 1.0]}},
        "model": {"student": {"name": "resnet8", "kwargs": {"note": "a=b"}}},
    }
    train = from_mapping(TrainConfig, sections["train"], TRAIN)
    assert (train.lr, train.loss.alpha, train.loss.temperature, train.augment.scale) == (3e-4, 0.9, 2.0, (0.2, 1.0))


def test_later_overrides_win_and_a_null_section_is_replaced() -> None:
    sections: dict[str, dict] = {"train": {"loss": None, "lr": 0.1}}
    apply_overrides(sections, ["train.lr=0.2", "train.lr=0.3", "train.loss.alpha=1"])
    assert sections == {"train": {"lr": 0.3, "loss": {"alpha": 1}}}


@pytest.mark.parametrize(("override", "message"), [
    ("train.lr", "--set `train.lr`: expected SECTION.KEY=VALUE with SECTION one of data, train, model "
                 "(e.g. --set train.loss.alpha=0.9)"),
    ("train=3", "--set `train=3`: expected SECTION.KEY=VALUE"),
    ("train..lr=3", "--set `train..lr=3`: expected SECTION.KEY=VALUE"),
    ("trian.lr=1", "--set `trian.lr=1`: unknown section `trian`; the first part names the config file: data, train, "
                   "model; did you mean `train`?"),
    ("optim.lr=1", "--set `optim.lr=1`: unknown section `optim`; the first part names the config file: data, train, "
                   "model"),
    ("train.augment.scale=[0.2, 1.0", "--set `train.augment.scale=[0.2, 1.0`: the value is not valid YAML ("),
    ("train.lr.x=1", "--set `train.lr.x=1`: `lr` in the train config is 0.1, not a section of keys; set `train.lr` "
                     "itself"),
])
def test_override_errors(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        apply_overrides({"train": {"lr": 0.1}}, [override])


def test_overrides_are_validated_with_the_file_they_change(tmp_path: Path) -> None:
    paths = write_configs(tmp_path, train="lr: 0.1\nloss:\n  alpha: 0.2\n")
    cfg = load_run_config(*paths, overrides=["train.lr=3e-4", "train.loss.alpha=0.9", "model.student.name=resnet8",
                                              "data.shards_per_epoch=null"])
    assert (cfg.train.lr, cfg.train.loss.alpha, cfg.model.student.name, cfg.data.shards_per_epoch) == \
        (3e-4, 0.9, "resnet8", None)
    with pytest.raises(ConfigError, match=exactly(f"unknown key `loss.alhpa` in {paths[1]} (with --set "
                                                  "train.loss.alhpa=0.9); did you mean `loss.alpha`?")):
        load_run_config(*paths, overrides=["train.loss.alhpa=0.9"])
    with pytest.raises(ConfigError, match=exactly(f"{paths[0]} (with --set data.shards_per_epoch=0): "
                                                  "`shards_per_epoch` must be at least 1, got 0")):
        load_run_config(*paths, overrides=["data.shards_per_epoch=0"])


def test_run_config_errors_name_the_file(tmp_path: Path) -> None:
    paths = write_configs(tmp_path, train="loss:\n  alhpa: 0.9\n")
    with pytest.raises(ConfigError,
                       match=exactly(f"unknown key `loss.alhpa` in {paths[1]}; did you mean `loss.alpha`?")):
        load_run_config(*paths)
    paths = write_configs(tmp_path, model="teacher:\n  name: resnet20\n")
    with pytest.raises(ConfigError, match=exactly(f"`num_classes` is missing in {paths[2]}; set it to the number of "
                                                  "classes the networks predict, e.g. 10")):
        load_run_config(*paths)
    paths[1].unlink()  # the model file still lacks num_classes: both problems come at once
    with pytest.raises(ConfigError, match=exactly(f"{paths[1]}: no such file; pass --train-config PATH\n"
                                                  f"`num_classes` is missing in {paths[2]}; set it to the number of "
                                                  "classes the networks predict, e.g. 10")):
        load_run_config(*paths)


# --- paths ---------------------------------------------------------------------------------------------------------


def test_relative_paths_are_taken_from_each_file_s_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    data = write_configs(Path("d"), data="cache_root: cache\n")[0]
    train = write_configs(Path("t"), train="run_dir: runs/x\neval:\n  cache_root: ../evalcache\n")[1]
    model = write_configs(Path("m"), model="num_classes: 3\nteacher:\n  checkpoint: w/teacher.pt\n"
                                           "student:\n  checkpoint: ~/student.pt\n")[2]
    cfg = load_run_config(data, train, model)
    assert cfg.data.cache_root == str(tmp_path / "d" / "cache")
    assert cfg.train.eval.cache_root == str(tmp_path / "t" / "../evalcache")
    assert cfg.model.teacher.checkpoint == str(tmp_path / "m" / "w/teacher.pt")
    assert cfg.model.student.checkpoint == str(tmp_path / "home" / "student.pt")
    assert cfg.train.run_dir == "runs/x"  # relative to the current directory, left as written
    cfg = load_run_config(data, train, model,
                          overrides=["train.eval.cache_root=/abs/ev", "model.teacher.checkpoint=null"])
    assert (cfg.train.eval.cache_root, cfg.model.teacher.checkpoint) == ("/abs/ev", None)


def test_config_modules_import_without_torch() -> None:
    code = "import sys, shardstore.config.resolve; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_paths_given_with_set_are_relative_to_the_current_directory(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load_run_config(DEFAULT_DATA_CONFIG, DEFAULT_TRAIN_CONFIG, DEFAULT_MODEL_CONFIG,
                          ["data.cache_root=mine/cache", "model.student.checkpoint=w.pt"])
    assert cfg.data.cache_root == str(tmp_path / "mine" / "cache")
    assert cfg.model.student.checkpoint == str(tmp_path / "w.pt")
    # ...while a path written in a file stays relative to that file
    assert cfg.model.teacher.checkpoint.startswith(str(DEFAULT_CONFIG_DIR.resolve().parent)) or \
        "shardstore-demo" in cfg.model.teacher.checkpoint
