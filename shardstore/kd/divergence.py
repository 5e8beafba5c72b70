"""A run that diverged: a NaN or infinite loss stops training before its weights are saved, with what to change."""

from __future__ import annotations

from pathlib import Path

import torch

from shardstore.config.resolve import RunConfig
from shardstore.errors import ShardstoreError


class NonFiniteLossError(ShardstoreError):
    """The training loss became NaN or infinite; the weights after it were not saved."""


def finite_weights(module: torch.nn.Module) -> bool:
    """Whether every floating-point parameter and buffer of ``module`` is finite (one host sync)."""
    checks = [torch.isfinite(v).all() for v in module.state_dict().values() if v.is_floating_point()]
    return bool(torch.stack(checks).all()) if checks else True


def diverged(cfg: RunConfig, *, epoch: int, step: int, global_step: int, last_good: Path | None,
             autocast: bool, float_images: bool = False) -> NonFiniteLossError:
    """The one-line error: where it happened, which checkpoint is kept, and the likely fixes."""
    t = cfg.train
    kept = f"the last good checkpoint is {last_good}" if last_good is not None else "no checkpoint was saved before it"
    fixes = [f"lower train.lr (now {t.lr:g})"]
    if float_images:  # a NaN/inf pixel poisons the loss at any lr; only the first images were checked at start
        fixes.insert(0, "check the cache's float images for NaN or inf values (only the first 16 are checked at start)")
    if t.grad_clip is None:
        fixes.append("set train.grad_clip (e.g. 1.0)")
    if autocast:
        fixes.append("try train.amp: off")
    # A resumed run keeps the saved learning rate, so the fix takes a new run.
    return NonFiniteLossError(
        f"the training loss became NaN or infinite in epoch {epoch + 1} by step {step} (global step {global_step}); "
        f"training stopped without saving these weights, and {kept}; {', '.join(fixes)}, and start again in a new "
        "train.run_dir")
