"""Learning-rate rules for distillation runs: the linear batch-size scaling rule, and warmup then cosine decay."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from shardstore.errors import ConfigError


def scaled_lr(base_lr: float, global_batch: int, base_batch: int) -> float:
    """The linear scaling rule (Goyal et al., 2017): ``base_lr`` tuned at ``base_batch``, scaled to ``global_batch``."""
    if not base_lr > 0.0:
        raise ConfigError(f"base learning rate must be positive, got {base_lr}")
    if global_batch < 1 or base_batch < 1:
        raise ConfigError(
            f"batch sizes for lr scaling must be at least 1, got global_batch={global_batch}, base_batch={base_batch}"
        )
    return base_lr * global_batch / base_batch


def warmup_cosine_factor(update: int, *, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """The multiplier of the base lr at optimizer update ``update`` (counted from 0).

    Linear warmup ``(update + 1) / warmup_steps`` for the first ``warmup_steps`` updates, so the
    first update already moves the weights; then half a cosine from 1 down to ``min_lr_ratio``,
    reached at ``update == total_steps`` and held after it.
    """
    if update < warmup_steps:
        return (update + 1) / warmup_steps
    decay_steps = total_steps - warmup_steps
    progress = 1.0 if decay_steps == 0 else min((update - warmup_steps) / decay_steps, 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(
    optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0
) -> LambdaLR:
    """A scheduler for ``optimizer`` following ``warmup_cosine_factor``; call its ``step()`` once per optimizer update.

    ``LambdaLR`` sets ``factor(0)`` on construction, so update ``k`` (the ``k``-th call of
    ``optimizer.step()``, from 0) runs at ``base_lr * warmup_cosine_factor(k)`` when
    ``scheduler.step()`` follows each ``optimizer.step()``. Its ``state_dict()`` holds the update
    count, so a resumed run continues the same curve.
    """
    if total_steps < 1:
        raise ConfigError(f"schedule `total_steps` must be at least 1, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ConfigError(f"schedule `warmup_steps` must be in [0, total_steps={total_steps}], got {warmup_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ConfigError(f"schedule `min_lr_ratio` must be in [0, 1], got {min_lr_ratio}; 0 decays to zero")

    def factor(update: int) -> float:
        return warmup_cosine_factor(
            update, total_steps=total_steps, warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio
        )

    return LambdaLR(optimizer, factor)
