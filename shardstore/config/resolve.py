"""The three config files of a run loaded together: overrides applied, each validated, relative paths resolved."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from shardstore.config.data import DataConfig, data_config_from_dict
from shardstore.config.model import ModelConfig, NetworkConfig
from shardstore.config.overrides import SECTIONS, apply_overrides
from shardstore.config.schema import Problems, from_mapping, load_yaml, parse_yaml, to_dict, yaml_problem
from shardstore.config.train import TrainConfig
from shardstore.errors import ConfigError

DEFAULT_CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
"""The repository's ``configs/`` folder: the CLI's defaults."""
DEFAULT_DATA_CONFIG = DEFAULT_CONFIG_DIR / "data_config.yaml"
DEFAULT_TRAIN_CONFIG = DEFAULT_CONFIG_DIR / "train_config_kd.yaml"
DEFAULT_MODEL_CONFIG = DEFAULT_CONFIG_DIR / "model_config_kd.yaml"


@dataclass(frozen=True)
class RunConfig:
    """Everything a distillation run is configured with."""

    data: DataConfig
    """Where the cache is and how epochs draw from it."""
    train: TrainConfig
    """Optimizer, schedule, loss, evaluation, checkpoints, logging."""
    model: ModelConfig
    """Teacher and student."""


def load_run_config(data_path: str | os.PathLike[str], train_path: str | os.PathLike[str],
                    model_path: str | os.PathLike[str], overrides: Iterable[str] = ()) -> RunConfig:
    """Load and validate the three files with ``--set`` ``overrides`` applied; relative paths become absolute.

    In a file, ``cache_root`` is taken from the data file's folder, ``eval.cache_root`` from the train file's and
    the teacher's and student's ``checkpoint`` from the model file's; a path given with ``--set`` is taken from the
    current directory, like any path typed on a command line. ``run_dir`` stays relative to the current directory.

    The three files are checked whole: every problem found in any of them (and in the overrides) comes in one
    ``ConfigError``, one line each.
    """
    overrides = list(overrides)
    paths = {"data": Path(data_path), "train": Path(train_path), "model": Path(model_path)}
    problems = Problems()
    loaded = {name: problems.attempt(lambda: load_yaml(path, option=f"--{name}-config"))
              for name, path in paths.items()}
    sections = {name: values or {} for name, values in loaded.items()}
    problems.attempt(lambda: apply_overrides(sections, overrides))
    _absolute_override_paths(sections, overrides)
    sources = {name: _source(path, name, overrides) for name, path in paths.items()}
    # A file that could not be read is not checked again as an empty one (that would add "missing" lines).
    data = problems.attempt(lambda: data_config_from_dict(sections["data"], sources["data"])) \
        if loaded["data"] is not None else None
    train = problems.attempt(lambda: from_mapping(TrainConfig, sections["train"], sources["train"])) \
        if loaded["train"] is not None else None
    model = problems.attempt(lambda: from_mapping(ModelConfig, sections["model"], sources["model"])) \
        if loaded["model"] is not None else None
    problems.raise_any()
    assert data is not None and train is not None and model is not None
    folders = {name: path.absolute().parent for name, path in paths.items()}
    data = replace(data, cache_root=_resolve(data.cache_root, folders["data"]))
    if data.local_cache is not None:
        data = replace(data, local_cache=_resolve(data.local_cache, folders["data"]))
    if train.eval.cache_root is not None:
        train = replace(train, eval=replace(train.eval, cache_root=_resolve(train.eval.cache_root, folders["train"])))
    model = replace(model, teacher=_resolve_checkpoint(model.teacher, folders["model"]),
                    student=_resolve_checkpoint(model.student, folders["model"]))
    return RunConfig(data=data, train=train, model=model)


#: Keys holding paths, by section.
PATH_KEYS = {("data", "cache_root"), ("data", "local_cache"), ("train", "eval", "cache_root"),
             ("model", "teacher", "checkpoint"), ("model", "student", "checkpoint")}


def _absolute_override_paths(sections: dict[str, dict[str, Any]], overrides: list[str]) -> None:
    """Paths set on the command line are relative to the current directory: make them absolute now."""
    for item in overrides:
        key = tuple(item.partition("=")[0].strip().split("."))
        if key not in PATH_KEYS:
            continue
        node: Any = sections
        for part in key[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        value = node.get(key[-1]) if isinstance(node, dict) else None
        if isinstance(value, str) and value and not os.path.isabs(os.path.expanduser(value)) and "://" not in value:
            node[key[-1]] = os.path.abspath(os.path.expanduser(value))


def run_config_to_yaml(cfg: RunConfig) -> str:
    """The configuration as YAML with sections ``data``, ``train``, ``model``; read back by ``run_config_from_yaml``."""
    sections = {"data": to_dict(cfg.data), "train": to_dict(cfg.train), "model": to_dict(cfg.model)}
    return yaml.dump(sections, Dumper=_Dumper, sort_keys=False)


def run_config_from_yaml(text: str, source: str = "config.yaml") -> RunConfig:
    """Validate a configuration written by ``run_config_to_yaml`` (paths are taken as written)."""
    try:
        values = parse_yaml(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: {yaml_problem(exc)}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a mapping with sections data, train, model; got {type(values).__name__}")
    problems = Problems()
    for name in values:
        if name not in SECTIONS:
            problems.add(f"unknown section `{name}` in {source}; the sections are data, train, model")
    for name in SECTIONS:
        if name not in values:
            problems.add(f"section `{name}` is missing in {source}; write the whole file with run_config_to_yaml")
    problems.raise_any()
    data = problems.attempt(lambda: data_config_from_dict(values["data"], f"{source} (data)"))
    train = problems.attempt(lambda: from_mapping(TrainConfig, values["train"], source, prefix="train."))
    model = problems.attempt(lambda: from_mapping(ModelConfig, values["model"], source, prefix="model."))
    problems.raise_any()
    assert data is not None and train is not None and model is not None
    return RunConfig(data=data, train=train, model=model)


class _Dumper(yaml.SafeDumper):
    """Sections as blocks, lists on one line (``scale: [0.35, 1.0]``), as the shipped files write them."""


_Dumper.add_representer(list, lambda dumper, data: dumper.represent_sequence(
    "tag:yaml.org,2002:seq", data, flow_style=True))


def _source(path: Path, name: str, overrides: list[str]) -> str:
    """The file name used in messages, with the overrides that changed it (a bad key may come from either)."""
    mine = [o for o in overrides if o.partition("=")[0].split(".")[0].strip() == name]
    return f"{path} (with --set {' '.join(mine)})" if mine else str(path)


def _resolve(value: str, folder: Path) -> str:
    if "://" in value:  # an object-store URL is not a path
        return value
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else folder / path)


def _resolve_checkpoint(net: NetworkConfig, folder: Path) -> NetworkConfig:
    if net.checkpoint is None or "://" in net.checkpoint:
        return net
    return replace(net, checkpoint=_resolve(net.checkpoint, folder))

