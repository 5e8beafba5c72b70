"""Everything a distillation run is built from, made from the three configs: data, models, loss, optimizer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from shardstore.config.resolve import RunConfig
from shardstore.dataset.subset import RandomShardSubsetCachedDataset
from shardstore.errors import ConfigError
from shardstore.kd.distributed import DistInfo
from shardstore.kd.losses import DistillationLoss
from shardstore.kd.models.io import InputAdapter, freeze, load_checkpoint_into, load_torchscript
from shardstore.kd.models.registry import build_model
from shardstore.manifest.reader import ShardStore

IMAGE_FIELD = "images"
LABEL_FIELD = "labels"


@dataclass
class Data:
    """The training dataset (this rank's part of each epoch) and the evaluation store, if any."""

    train: RandomShardSubsetCachedDataset
    eval_store: ShardStore | None
    held_out_ids: list[int]


def build_data(cfg: RunConfig, info: DistInfo) -> Data:
    """Open the cache; hold out its last ``eval.held_out_shards`` shards (by id) or open the evaluation cache."""
    store = ShardStore.open(cfg.data.cache_root)
    for name in (IMAGE_FIELD, LABEL_FIELD) + ((cfg.train.loss.target_field,) if cfg.train.loss.target_field else ()):
        if name not in store.fields:
            raise ConfigError(f"the cache {store.root} has no field {name!r} (it has {sorted(store.fields)}); "
                              "write it, or fix the configuration")
    held = cfg.train.eval.held_out_shards
    eval_store, held_ids = None, []
    if held:
        if held >= store.num_shards:
            raise ConfigError(f"train_config: eval.held_out_shards={held} leaves no training shard "
                              f"(the cache has {store.num_shards}); lower it")
        held_ids = [int(i) for i in store.shard_ids[-held:]]
        eval_store = store.subset(range(store.num_shards - held, store.num_shards))
        store = store.subset(range(store.num_shards - held))
    elif cfg.train.eval.cache_root:
        eval_store = ShardStore.open(cfg.train.eval.cache_root)
    d = cfg.data
    train = RandomShardSubsetCachedDataset(
        store, d.shards_per_epoch, d.random_subset_seed, d.shard_policy, order=d.sample_order,
        active_shards=d.active_shards, batch_size=cfg.train.batch_size,
        max_steps_per_epoch=cfg.train.max_steps_per_epoch, rank=info.rank, world_size=info.world_size)
    return Data(train, eval_store, held_ids)


def build_teacher(cfg: RunConfig, device: torch.device) -> InputAdapter | None:
    """The frozen teacher with its own input pipeline; None when the targets come from the cache."""
    if cfg.train.loss.target_field:
        return None
    t = cfg.model.teacher
    if t.checkpoint_format == "torchscript":
        if not t.checkpoint:
            raise ConfigError("model_config: teacher.checkpoint_format is torchscript but teacher.checkpoint is "
                              "not set; name the TorchScript file")
        model: nn.Module = load_torchscript(t.checkpoint)
    else:
        model = build_model(t.name, cfg.model.num_classes, image_size=t.input.size, **t.kwargs)
        if t.checkpoint:
            load_checkpoint_into(model, t.checkpoint)
    teacher = InputAdapter(model, size=t.input.size, mean=t.input.mean, std=t.input.std)
    teacher = freeze(teacher).to(device)
    if t.dtype == "bfloat16":
        teacher = teacher.to(torch.bfloat16)
    return teacher


def build_student(cfg: RunConfig) -> InputAdapter:
    s = cfg.model.student
    model = build_model(s.name, cfg.model.num_classes, image_size=s.input.size, **s.kwargs)
    if s.checkpoint:
        load_checkpoint_into(model, s.checkpoint)
    return InputAdapter(model, size=s.input.size, mean=s.input.mean, std=s.input.std)


class Trainable(nn.Module):
    """What the optimizer updates and DDP synchronises: the student and the loss's projector.

    The teacher stays outside: it is frozen, and DDP must not see it.
    """

    def __init__(self, student: InputAdapter, criterion: DistillationLoss) -> None:
        super().__init__()
        self.student = student
        self.criterion = criterion

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None, teacher_logits: torch.Tensor | None,
                teacher_features: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        if self.criterion.projector is not None:
            features = self.student.forward_features(images)
            logits = self.student.forward_head(features)
        else:
            features, logits = None, self.student(images)
        loss, parts = self.criterion(logits, labels, teacher_logits=teacher_logits,
                                     student_features=features, teacher_features=teacher_features)
        return loss, parts, logits


def build_criterion(cfg: RunConfig, student: InputAdapter, teacher: InputAdapter | None) -> DistillationLoss:
    loss = cfg.train.loss
    uses_features = loss.feature_loss != "none"
    if uses_features and teacher is None:
        raise ConfigError("train_config: loss.feature_loss needs a live teacher (its embeddings); "
                          "unset loss.target_field or set loss.feature_loss: none")
    return DistillationLoss(alpha=loss.alpha, temperature=loss.temperature, feature_loss=loss.feature_loss,
                            feature_weight=loss.feature_weight, student_dim=student.num_features,
                            teacher_dim=teacher.num_features if uses_features and teacher is not None else 0,
                            projector_hidden=loss.projector_hidden)


def build_optimizer(cfg: RunConfig, module: nn.Module, lr: float) -> torch.optim.Optimizer:
    """AdamW or SGD; no weight decay on biases and normalisation weights (1-D parameters)."""
    decay = [p for p in module.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in module.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if cfg.train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.train.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=lr)
