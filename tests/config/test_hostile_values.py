"""Hostile config values: YAML aliases (a "billion laughs", a recursive alias), non-finite floats, huge integers.

Each is refused while the configs are loaded, as one ``ConfigError`` line naming the file (or the ``--set``) and the
key, whether it comes from a file or from ``--set``.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest

from shardstore.cli import main
from shardstore.config.model import ModelConfig
from shardstore.config.resolve import load_run_config, run_config_from_yaml
from shardstore.config.schema import from_mapping, load_yaml, parse_yaml
from shardstore.config.train import TrainConfig
from shardstore.errors import ConfigError
from tests.config.test_train_model_config import write_configs

ALIASES = "anchors and aliases (&name, *name) are not supported"
ALIASES_RE = re.escape(ALIASES)

# Nine levels of nine aliases: 9**9 (387 million) strings once expanded, in well under 1 KB of YAML.
BILLION_LAUGHS = "student:\n  kwargs:\n    l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"    l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 9))
BILLION_LAUGHS_VALUE = "[" + ", ".join(["&l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"] + [
    f"&l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]) + "]"
# Three levels (729 strings): what a regression would expand and print, fast, instead of hanging.
SMALL_LAUGHS = BILLION_LAUGHS.split("    l3:")[0]
RECURSIVE = "&loop {self: *loop}"


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


# --- aliases -------------------------------------------------------------------------------------------------------


def test_billion_laughs_in_a_file_is_refused_before_expanding(tmp_path: Path) -> None:
    assert len(BILLION_LAUGHS.encode()) < 1000
    paths = write_configs(tmp_path, model="num_classes: 10\n" + BILLION_LAUGHS)
    with pytest.raises(ConfigError, match=rf"^{paths[2]}: YAML {ALIASES_RE} \(line \d+\); write each value out") as exc:
        load_run_config(*paths)
    one_line(exc)


@pytest.mark.parametrize("which", [0, 1, 2], ids=["data", "train", "model"])
def test_a_recursive_alias_in_any_file_is_refused(tmp_path: Path, which: int) -> None:
    texts = ["cache_root: cache\n", "", "num_classes: 10\n"]
    texts[which] += ["random_subset_seed: &s 1\nshards_per_epoch: *s\n", f"loss: {RECURSIVE}\n",
                     f"student:\n  kwargs: {RECURSIVE}\n"][which]
    paths = write_configs(tmp_path, *texts)
    with pytest.raises(ConfigError, match=rf"^{paths[which]}: YAML {ALIASES_RE}") as exc:
        load_run_config(*paths)
    one_line(exc)


@pytest.mark.parametrize("value", [BILLION_LAUGHS_VALUE, RECURSIVE, "*undefined", "&a 3"],
                         ids=["billion-laughs", "recursive", "alias", "anchor"])
def test_aliases_in_a_set_value_are_refused(tmp_path: Path, value: str) -> None:
    item = f"model.student.kwargs.x={value}"
    with pytest.raises(ConfigError, match=rf"^--set `model\.student\.kwargs\.x=.*`: YAML {ALIASES_RE}") as exc:
        load_run_config(*write_configs(tmp_path), overrides=[item])
    one_line(exc)


def test_aliases_are_refused_by_every_yaml_reader(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(f"x: {RECURSIVE}\n")
    with pytest.raises(ConfigError, match=ALIASES_RE):
        load_yaml(tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match=rf"^config.yaml: YAML {ALIASES_RE}"):
        run_config_from_yaml(BILLION_LAUGHS)
    assert parse_yaml("a: [1, {b: c}]\nd: '&not an anchor *nor alias'\n") == {
        "a": [1, {"b": "c"}], "d": "&not an anchor *nor alias"}


@pytest.mark.parametrize("how", ["file", "set"])
def test_the_cli_refuses_aliases_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, how: str) -> None:
    data, train, model = write_configs(tmp_path, model="num_classes: 10\n" + (SMALL_LAUGHS if how == "file" else ""))
    args = ["train", "--data-config", str(data), "--train-config", str(train), "--model-config", str(model)]
    if how == "set":
        args += ["--set", f"model.student.kwargs={RECURSIVE}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and ALIASES in err and "Traceback" not in err
    assert (str(model) if how == "file" else "--set `model.student.kwargs=") in err


# --- non-finite floats ---------------------------------------------------------------------------------------------


def float_keys(cls: type, prefix: str = "") -> list[tuple[str, int]]:
    """``(dotted key, number of floats)`` for every float-valued key of a config class, nested sections included."""
    out = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if dataclasses.is_dataclass(tp):
            out += float_keys(tp, f"{prefix}{f.name}.")
        elif tp is float or args == [float]:
            out.append((prefix + f.name, 1))
        elif typing.get_origin(tp) is tuple and set(typing.get_args(tp)) - {Ellipsis} == {float}:
            variadic = typing.get_args(tp)[-1] is Ellipsis  # tuple[float, ...]: as many as the default has
            out.append((prefix + f.name, len(f.default) if variadic else len(typing.get_args(tp))))
    return out


FLOAT_KEYS = [f"train.{k}" for k in float_keys(TrainConfig)] + [f"model.{k}" for k in float_keys(ModelConfig)]


def test_float_keys_are_all_found() -> None:
    names = {k for k, _ in float_keys(TrainConfig)} | {k for k, _ in float_keys(ModelConfig)}
    assert {"lr", "weight_decay", "momentum", "min_lr_ratio", "grad_clip", "ema_decay", "loss.alpha",
            "loss.temperature", "loss.feature_weight", "loss.live_fraction", "augment.scale",
            "teacher.input.mean", "student.input.std"} <= names


@pytest.mark.parametrize("key", [k for k, _ in float_keys(TrainConfig)] + [k for k, _ in float_keys(ModelConfig)])
# every key, one spelling by default
@pytest.mark.parametrize("value", [".nan", *(pytest.param(v, marks=pytest.mark.slow)
                                              for v in (".inf", "-.inf", "1e400"))])
def test_every_float_key_refuses_non_finite_values_in_a_file(tmp_path: Path, key: str, value: str) -> None:
    section = "train" if key in {k for k, _ in float_keys(TrainConfig)} else "model"
    count = dict(float_keys(TrainConfig if section == "train" else ModelConfig))[key]
    text = value if count == 1 else "[" + ", ".join([value] * count) + "]"
    *parents, leaf = key.split(".")
    yaml_text = "".join(f"{'  ' * d}{p}:\n" for d, p in enumerate(parents)) + f"{'  ' * len(parents)}{leaf}: {text}\n"
    paths = write_configs(tmp_path, **{section: yaml_text + ("num_classes: 10\n" if section == "model" else "")})
    suffix = r"\[0\]" if count > 1 else ""
    with pytest.raises(ConfigError, match=rf"^{paths[1 if section == 'train' else 2]}: `{key}{suffix}` must be a "
                                          r"finite number, got .*; write an ordinary number") as exc:
        load_run_config(*paths)
    one_line(exc)


@pytest.mark.parametrize("item", ["train.lr=.inf", "train.lr=.nan", "train.lr=-.inf", "train.weight_decay=.nan",
                                  "train.momentum=.nan", "train.loss.temperature=.inf", "train.loss.alpha=.nan",
                                  "train.grad_clip=.inf", "model.student.input.mean=[.nan, 0.5, 0.5]",
                                  "train.lr=1e400"])
def test_non_finite_values_given_with_set_are_refused(tmp_path: Path, item: str) -> None:
    key = item.partition("=")[0].split(".", 1)[1]
    pattern = rf"\(with --set {re.escape(item)}\): `{key}(\[0\])?` must be a finite number"
    with pytest.raises(ConfigError, match=pattern) as exc:
        load_run_config(*write_configs(tmp_path), overrides=[item])
    one_line(exc)


def test_the_cli_refuses_an_infinite_lr(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data, train, model = write_configs(tmp_path, train="lr: .inf\n")
    assert main(["train", "--data-config", str(data), "--train-config", str(train), "--model-config", str(model)]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"shardstore: error: {train}: `lr` must be a finite number, got inf; write an "
                                        "ordinary number (YAML reads .inf and .nan as infinity and not-a-number)"]


# --- integers too large for any seed or count ----------------------------------------------------------------------


@pytest.mark.parametrize("value", [2**63, 2**70, 10**30, -(2**63) - 1])
@pytest.mark.parametrize("key", ["data.random_subset_seed", "train.seed", "train.epochs", "data.shards_per_epoch"])
def test_integers_beyond_64_bits_are_refused(tmp_path: Path, key: str, value: int) -> None:
    section, leaf = key.split(".")
    paths = write_configs(tmp_path, data=f"cache_root: cache\n{leaf}: {value}\n" if section == "data" else
                          "cache_root: cache\n", train=f"{leaf}: {value}\n" if section == "train" else "")
    where = paths[0 if section == "data" else 1]
    with pytest.raises(ConfigError, match=rf"^{where}: `{leaf}` must be between -2\*\*63 and 2\*\*63-1 \(a 64-bit "
                                          rf"integer\), got {value}$"):
        load_run_config(*paths)
    with pytest.raises(ConfigError, match=rf"\(with --set {key}={value}\): `{leaf}` must be between -2\*\*63"):
        load_run_config(*write_configs(tmp_path / "set"), overrides=[f"{key}={value}"])


def test_the_largest_seeds_are_accepted(tmp_path: Path) -> None:
    cfg = load_run_config(*write_configs(tmp_path), overrides=[f"data.random_subset_seed={2**63 - 1}",
                                                               f"train.seed={2**63 - 1}"])
    assert cfg.data.random_subset_seed == cfg.train.seed == 2**63 - 1


def test_an_integer_of_thousands_of_digits_is_one_line(tmp_path: Path) -> None:
    paths = write_configs(tmp_path, train=f"seed: {'7' * 5000}\n")
    with pytest.raises(ConfigError, match=rf"^{paths[1]}: not valid YAML \(an integer has thousands of digits; no "
                                          r"setting needs one\)$"):
        load_run_config(*paths)
    # From Python, such a number is described by its size, never printed (or failing to print) in full.
    with pytest.raises(ConfigError, match=r"^t.yaml: `seed` must be between .*, got an integer of about 1500 digits$"):
        from_mapping(TrainConfig, {"seed": 7**1775}, "t.yaml")
