"""The frozen teacher: whether a run needs it, loading it, rendering its input, running it, and what identifies it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from shardstore.config.resolve import RunConfig
from shardstore.errors import ConfigError
from shardstore.kd.augment import apply_views
from shardstore.kd.autocast import amp_enabled
from shardstore.kd.images import network_inputs
from shardstore.kd.models.io import InputAdapter, freeze, load_checkpoint_into, load_torchscript
from shardstore.kd.models.registry import build_model
from shardstore.manifest.checksum import file_checksum
from shardstore.sampling.seeds import TEACHER_INIT, derive_seed

log = logging.getLogger(__name__)


def build_teacher(cfg: RunConfig, device: torch.device) -> InputAdapter | None:
    """The frozen teacher with its own input pipeline; None when the targets come from the cache.

    With cached teacher targets (``data.teacher_targets``) the teacher is loaded only for
    hybrid teaching (``loss.live_fraction`` > 0); training on labels alone (``alpha: 0``)
    loads it only when it has a checkpoint (evaluation then reports agreement with it).
    """
    return load_teacher(cfg, device) if teacher_needed(cfg) else None


def teacher_needed(cfg: RunConfig) -> bool:
    """Whether a run loads the live teacher (see ``build_teacher``)."""
    if cfg.train.loss.target_field:
        return False
    if cfg.data.teacher_targets and cfg.train.loss.live_fraction == 0:
        return False
    loss = cfg.train.loss
    # labels only, and no trained teacher to report agreement with
    return not (loss.alpha == 0 and loss.feature_loss == "none" and not cfg.model.teacher.checkpoint)


def load_teacher(cfg: RunConfig, device: torch.device) -> InputAdapter:
    """The frozen teacher of the model config, on ``device`` (in ``teacher.dtype``)."""
    t = cfg.model.teacher
    inputs = network_inputs(t, "teacher", cfg.data)
    if t.checkpoint_format == "torchscript":
        if not t.checkpoint:
            raise ConfigError("model_config: teacher.checkpoint_format is torchscript but teacher.checkpoint is "
                              "not set; name the TorchScript file")
        model: nn.Module = load_torchscript(t.checkpoint)
    else:
        # On its own random stream: whether a teacher is built must not change the student's initial weights.
        # Without a checkpoint (tests, smoke runs) that also makes it the same random teacher wherever it is built.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(cfg.train.seed, stream=TEACHER_INIT))  # never the student's weights
            model = build_model(t.name, cfg.model.num_classes, image_size=t.input.size, **inputs["kwargs"])
        if t.checkpoint:
            load_checkpoint_into(model, t.checkpoint)
        else:
            log.warning("model_config: teacher.checkpoint is not set; the teacher is randomly initialised (seed %d)",
                        cfg.train.seed)
    teacher = InputAdapter(model, size=t.input.size, mean=inputs["mean"], std=inputs["std"])
    teacher = freeze(teacher).to(device)
    if t.dtype == "bfloat16":
        teacher = teacher.to(torch.bfloat16)
    return teacher


def render_teacher_input(images: Tensor, views: Tensor, teacher: InputAdapter) -> Tensor:
    """Images ``[B, C, H, W]`` (``ImageFormat.images``) and views ``[B, 5]`` -> the float views at the teacher's size.

    Live teaching, caching and the consistency check all render the teacher's input this way.
    """
    return apply_views(images, views.float(), teacher.size)


def teacher_forward(teacher: InputAdapter, x: Tensor, *, features: bool) -> tuple[Tensor, Tensor | None]:
    """The teacher's float32 logits for the batch ``x`` and, with ``features``, its float32 pooled embedding."""
    if features:
        feats = teacher.forward_features(x)
        return teacher.forward_head(feats).float(), feats.float()
    return teacher(x).float(), None


#: what makes two teachers the same (the checkpoint is known by its content, not its path)
TEACHER_KEYS = ("name", "checkpoint_sha256", "init_seed", "input_size", "mean", "std", "dtype")


def teacher_identity(cfg: RunConfig, device: torch.device) -> dict[str, Any]:
    """The teacher as the targets record it: ``TEACHER_KEYS``, and where it was and how it ran, for information."""
    t = cfg.model.teacher
    return {"name": t.name, "checkpoint_sha256": file_checksum(Path(t.checkpoint)) if t.checkpoint else None,
            "init_seed": None if t.checkpoint else cfg.train.seed,  # a random teacher (tests) is its seed
            "input_size": t.input.size, "mean": list(t.input.mean), "std": list(t.input.std), "dtype": t.dtype,
            "checkpoint": t.checkpoint, "precision": "bf16" if amp_enabled(cfg, device) else "fp32"}
