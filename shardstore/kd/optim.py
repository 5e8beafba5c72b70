"""The optimizer over the trainable parameters, with its weight-decay groups."""

from __future__ import annotations

import torch
from torch import nn

from shardstore.config.resolve import RunConfig


def build_optimizer(cfg: RunConfig, module: nn.Module, lr: float) -> torch.optim.Optimizer:
    """AdamW or SGD; no weight decay on biases and normalisation weights (1-D parameters)."""
    decay = [p for p in module.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in module.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if cfg.train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.train.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=lr)
