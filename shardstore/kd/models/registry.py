"""The model registry: built-in model names mapped to factories, `timm:<name>` models, and `build_model`."""

from __future__ import annotations

import difflib
import importlib
import re
from collections.abc import Callable
from functools import partial
from typing import Any

from torch import Tensor, nn

from shardstore.errors import ConfigError
from shardstore.kd.models.resnet import SmallCNN, resnet
from shardstore.kd.models.vit import vit

TIMM_PREFIX = "timm:"

# Default widths: the CIFAR ResNets are the classic 16-wide ones of He et al. (resnet20: 0.27M parameters);
# the ImageNet ResNets are torchvision's 64-wide ones.
CIFAR_WIDTH = 16
VIT_PRESETS: dict[str, dict[str, Any]] = {
    "vit_tiny": {"dim": 192, "depth": 12, "heads": 3, "patch_size": 16},
    "vit_small": {"dim": 384, "depth": 12, "heads": 6, "patch_size": 16},
    "vit_micro": {"dim": 64, "depth": 4, "heads": 2, "patch_size": 4},
}


def _resnet_factory(
    depth: int, default_width: int, num_classes: int, *, in_chans: int = 3, image_size: int | None = None, **kwargs: Any
) -> nn.Module:
    """A ResNet of a fixed depth; `image_size` is ignored (the network pools globally)."""
    kwargs.setdefault("width", default_width)
    return resnet(depth, num_classes, in_chans=in_chans, **kwargs)


def _vit_factory(
    preset: str, num_classes: int, *, in_chans: int = 3, image_size: int = 224, **kwargs: Any
) -> nn.Module:
    """A ViT preset; any of its settings (dim, depth, heads, patch_size, mlp_ratio, pool) may be overridden."""
    return vit(num_classes, image_size=image_size, in_chans=in_chans, **{**VIT_PRESETS[preset], **kwargs})


def _cnn_small(num_classes: int, *, in_chans: int = 3, image_size: int | None = None, **kwargs: Any) -> nn.Module:
    """The 4-layer CNN (`width`, default 32); `image_size` is ignored."""
    return SmallCNN(num_classes, in_chans=in_chans, **kwargs)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet8": partial(_resnet_factory, 8, CIFAR_WIDTH),
    "resnet14": partial(_resnet_factory, 14, CIFAR_WIDTH),
    "resnet20": partial(_resnet_factory, 20, CIFAR_WIDTH),
    "resnet18": partial(_resnet_factory, 18, 64),
    "resnet34": partial(_resnet_factory, 34, 64),
    "resnet50": partial(_resnet_factory, 50, 64),
    "vit_tiny": partial(_vit_factory, "vit_tiny"),
    "vit_small": partial(_vit_factory, "vit_small"),
    "vit_micro": partial(_vit_factory, "vit_micro"),
    "cnn_small": _cnn_small,
}


class TimmModel(nn.Module):
    """A timm model seen through the shardstore contract: `forward_features` gives the pooled pre-logits
    embedding, `forward_head` the classifier applied to it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.num_features: int = int(getattr(model, "num_features"))

    def forward_features(self, x: Tensor) -> Tensor:
        """timm's pooled embedding: `forward_head(forward_features(x), pre_logits=True)`, [B, num_features]."""
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    def forward_head(self, features: Tensor) -> Tensor:
        """Logits from the pooled embedding, through timm's classifier."""
        return self.model.get_classifier()(features)

    def forward(self, x: Tensor) -> Tensor:
        """Logits [B, num_classes] from a normalised batch."""
        return self.forward_head(self.forward_features(x))


def _build_timm(name: str, num_classes: int, in_chans: int, kwargs: dict[str, Any]) -> nn.Module:
    """Create an untrained timm model and wrap it in `TimmModel`."""
    try:
        timm = importlib.import_module("timm")
    except ImportError:
        raise ConfigError(
            f"model '{TIMM_PREFIX}{name}' needs timm; install it with pip install timm (or shardstore[timm])"
        ) from None
    try:
        model = timm.create_model(name, num_classes=num_classes, pretrained=False, in_chans=in_chans, **kwargs)
    except RuntimeError as exc:
        if "Unknown model" not in str(exc):
            raise
        close = difflib.get_close_matches(name, timm.list_models(), n=1)
        hint = f"did you mean '{TIMM_PREFIX}{close[0]}'? " if close else ""
        raise ConfigError(
            f"model '{TIMM_PREFIX}{name}': timm has no such model; {hint}see timm.list_models()"
        ) from None
    except TypeError as exc:
        raise _bad_argument(f"{TIMM_PREFIX}{name}", kwargs, exc) from None
    return TimmModel(model)


def _bad_argument(name: str, kwargs: dict[str, Any], exc: TypeError) -> ConfigError:
    """A one-line ConfigError naming the model and the argument it rejected."""
    found = re.search(r"(?:unexpected keyword|multiple values for(?: keyword)?) argument '(\w+)'", str(exc))
    if found:
        return ConfigError(
            f"model '{name}' does not take the argument '{found.group(1)}'; remove it from the model config"
        )
    given = ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) or "none"
    first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return ConfigError(f"model '{name}' rejected its arguments ({given}): {first_line}; fix them in the model config")


def build_model(name: str, num_classes: int, *, image_size: int, in_chans: int = 3, **kwargs: Any) -> nn.Module:
    """Build a registry model by name, or `timm:<name>` through timm (untrained); extra keyword arguments go
    to the factory (e.g. width, small_input, patch_size). The result maps [B, C, H, W] to [B, num_classes] and
    has `num_features`, `forward_features` and `forward_head`."""
    if name.startswith(TIMM_PREFIX):
        return _build_timm(name[len(TIMM_PREFIX):], num_classes, in_chans, kwargs)
    factory = MODELS.get(name)
    if factory is None:
        close = difflib.get_close_matches(name, list(MODELS), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(
            f"unknown model '{name}'; {hint}valid names: {', '.join(MODELS)}, or {TIMM_PREFIX}<timm model name>"
        )
    try:
        return factory(num_classes, in_chans=in_chans, image_size=image_size, **kwargs)
    except TypeError as exc:
        raise _bad_argument(name, kwargs, exc) from None
