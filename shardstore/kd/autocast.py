"""Whether a run's networks run under bf16 autocast (training and teacher caching alike)."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from shardstore.config.resolve import RunConfig


def amp_enabled(cfg: RunConfig, device: torch.device) -> bool:
    """Whether teacher and student run under bf16 autocast: ``train.amp`` bf16, or auto on CUDA."""
    return cfg.train.amp == "bf16" or (cfg.train.amp == "auto" and device.type == "cuda")


def autocast_for(cfg: RunConfig, device: torch.device) -> AbstractContextManager:
    """bf16 autocast on ``device`` when ``amp_enabled``, else a context that changes nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if amp_enabled(cfg, device) else nullcontext()
