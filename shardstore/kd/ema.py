"""An exponential moving average of a model's weights, kept on a copy that is evaluated and checkpointed."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from shardstore.errors import ConfigError


class ModelEma:
    """``ema = decay * ema + (1 - decay) * current`` over parameters and buffers, after each ``update``.

    Built on ``torch.optim.swa_utils.AveragedModel`` with ``use_buffers=True``, so BatchNorm
    running statistics are averaged like the weights (integer buffers such as
    ``num_batches_tracked`` are averaged then truncated). As in ``AveragedModel``, the first
    ``update`` copies the model outright; the average starts from the second. The averaged copy
    (``module``) stays in eval mode and needs no gradients.
    """

    def __init__(self, model: nn.Module, decay: float, *, device: torch.device | str | None = None) -> None:
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"EMA `decay` must be in (0, 1), got {decay}; 0.999 to 0.9999 is usual")
        self.decay = float(decay)
        self._averaged = AveragedModel(
            model, device=device, multi_avg_fn=get_ema_multi_avg_fn(self.decay), use_buffers=True
        )
        self._averaged.eval()
        self._averaged.requires_grad_(False)

    @property
    def module(self) -> nn.Module:
        """The averaged copy of the model, in eval mode."""
        inner = self._averaged.module
        if inner.training:  # someone called .train() on it; an average is only ever evaluated
            inner.eval()
        return inner

    @property
    def num_updates(self) -> int:
        """How many times ``update`` has run (restored by ``load_state_dict``)."""
        return int(self._averaged.n_averaged.item())

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the current weights and buffers of ``model`` (same architecture) into the average."""
        self._averaged.update_parameters(model)

    def state_dict(self) -> dict[str, Any]:
        """The averaged weights (keys prefixed ``module.``) and the update count ``n_averaged``."""
        return self._averaged.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned; the model architecture must match."""
        self._averaged.load_state_dict(state_dict)
