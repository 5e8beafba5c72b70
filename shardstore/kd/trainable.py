"""What training updates: the student, the distillation loss, and the module that holds both."""

from __future__ import annotations

import torch
from torch import nn

from shardstore.config.resolve import RunConfig
from shardstore.errors import ConfigError
from shardstore.kd.images import network_inputs
from shardstore.kd.losses import DistillationLoss
from shardstore.kd.models.io import InputAdapter, load_checkpoint_into
from shardstore.kd.models.registry import build_model
from shardstore.kd.target_spec import TargetSpec


def build_student(cfg: RunConfig) -> InputAdapter:
    s = cfg.model.student
    inputs = network_inputs(s, "student", cfg.data)
    model = build_model(s.name, cfg.model.num_classes, image_size=s.input.size, **inputs["kwargs"])
    if s.checkpoint:
        load_checkpoint_into(model, s.checkpoint)
    return InputAdapter(model, size=s.input.size, mean=inputs["mean"], std=inputs["std"])


class Trainable(nn.Module):
    """What the optimizer updates and DDP synchronises: the student and the loss's projector.

    The teacher stays outside: it is frozen, and DDP must not see it.
    """

    def __init__(self, student: InputAdapter, criterion: DistillationLoss) -> None:
        super().__init__()
        self.student = student
        self.criterion = criterion

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None, teacher_logits: torch.Tensor | None,
                teacher_features: torch.Tensor | None, teacher_log_probs: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        if self.criterion.projector is not None:
            features = self.student.forward_features(images)
            logits = self.student.forward_head(features)
        else:
            features, logits = None, self.student(images)
        loss, parts = self.criterion(logits, labels, teacher_logits=teacher_logits,
                                     student_features=features, teacher_features=teacher_features,
                                     teacher_log_probs=teacher_log_probs)
        return loss, parts, logits


def build_criterion(cfg: RunConfig, student: InputAdapter, teacher: InputAdapter | None,
                    targets: TargetSpec | None = None) -> DistillationLoss:
    loss = cfg.train.loss
    uses_features = loss.feature_loss != "none"
    teacher_dim = 0
    if targets is not None:
        if uses_features and not targets.embedding_dim:
            raise ConfigError(f"train_config: loss.feature_loss needs teacher embeddings, the cached targets "
                              f"{targets.name!r} have none; cache them with --embeddings or set feature_loss: none")
        if loss.alpha > 0 and targets.logits == "none":
            raise ConfigError(f"train_config: loss.alpha > 0 needs teacher logits, the cached targets "
                              f"{targets.name!r} hold embeddings only; set alpha: 0 or cache logits too")
        teacher_dim = targets.embedding_dim if uses_features else 0
        if uses_features and teacher is not None and teacher.num_features != teacher_dim:
            raise ConfigError(f"the live teacher's embedding has {teacher.num_features} values, the cached one "
                              f"{teacher_dim}; cache the targets with this teacher")
    elif uses_features:
        if teacher is None:
            raise ConfigError("train_config: loss.feature_loss needs a live teacher (its embeddings); "
                              "unset loss.target_field or set loss.feature_loss: none")
        teacher_dim = teacher.num_features
    return DistillationLoss(alpha=loss.alpha, temperature=loss.temperature, feature_loss=loss.feature_loss,
                            feature_weight=loss.feature_weight, student_dim=student.num_features,
                            teacher_dim=teacher_dim, projector_hidden=loss.projector_hidden)
