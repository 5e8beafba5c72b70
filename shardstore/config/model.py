"""``model_config_kd.yaml`` as a typed object: the teacher, the student and the inputs they expect."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal

from shardstore.config.schema import at_least, from_mapping, load_yaml


@dataclass(frozen=True, kw_only=True)
class InputConfig:
    """The images a network expects: size and per-channel normalisation."""

    size: int = 224
    """Height and width in pixels."""
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    """Per-channel mean subtracted from images scaled to [0, 1] (one value per input channel: [0.5] for grayscale)."""
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    """Per-channel standard deviation images are divided by."""

    def __post_init__(self) -> None:
        at_least("size", self.size, 1)
        if not self.mean or len(self.mean) != len(self.std):
            raise ValueError(f"`mean` has {len(self.mean)} values and `std` {len(self.std)}; give one of each per "
                             "input channel, e.g. [0.485, 0.456, 0.406] and [0.229, 0.224, 0.225]")
        if not all(s > 0 for s in self.std):
            raise ValueError(f"`std` must be positive numbers, got {list(self.std)}; e.g. [0.229, 0.224, 0.225]")


@dataclass(frozen=True, kw_only=True)
class NetworkConfig:
    """What the teacher and the student have in common: which network, its inputs, its initial weights."""

    name: str
    """Registry name, or ``timm:<name>`` for a timm model."""
    input: InputConfig = field(default_factory=InputConfig)
    """The images the network expects."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra constructor arguments."""
    checkpoint: str | None = None
    """Initial weights (relative to the model config's folder); null = freshly initialised."""

    def __post_init__(self) -> None:
        if not self.name.strip() or self.name.strip() == "timm:":
            raise ValueError(f"`name` is {self.name!r}; name a registered network (e.g. resnet18) or timm:<name>")
        if self.checkpoint is not None and not self.checkpoint.strip():
            raise ValueError("`checkpoint` is empty; give the weights file or set it to null")


@dataclass(frozen=True, kw_only=True)
class StudentConfig(NetworkConfig):
    """The network being trained."""

    name: str = "resnet18"
    """Registry name, or ``timm:<name>`` for a timm model."""


@dataclass(frozen=True, kw_only=True)
class TeacherConfig(NetworkConfig):
    """The network whose outputs the student learns from (frozen, in eval mode)."""

    name: str = "resnet50"
    """Registry name, or ``timm:<name>`` for a timm model."""
    checkpoint_format: Literal["state_dict", "torchscript"] = "state_dict"
    """``state_dict`` (loaded with ``weights_only=True``) or ``torchscript`` (a whole model: code, trust it first)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Precision the teacher runs in."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.checkpoint_format == "torchscript" and self.checkpoint is None:
            raise ValueError("`checkpoint_format` is torchscript but `checkpoint` is null; "
                             "set checkpoint to the TorchScript file")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The teacher and the student of a distillation run."""

    num_classes: int = field(metadata={"fix": "the number of classes the networks predict, e.g. 10"})
    """Number of classes the teacher and the student predict."""
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    """The teacher."""
    student: StudentConfig = field(default_factory=StudentConfig)
    """The student."""

    def __post_init__(self) -> None:
        at_least("num_classes", self.num_classes, 2)


def model_config_from_dict(values: dict, source: str = "model_config_kd.yaml") -> ModelConfig:
    """Check a model config mapping; ``ConfigError`` naming ``source``, the key and the fix."""
    return from_mapping(ModelConfig, values, source)


def load_model_config(path: str | os.PathLike[str]) -> ModelConfig:
    """Read ``model_config_kd.yaml`` as is (``load_run_config`` also resolves the checkpoint paths)."""
    return model_config_from_dict(load_yaml(path, option="--model-config"), str(path))
