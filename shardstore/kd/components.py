"""Everything a distillation run is built from, made from the three configs: data, models, loss, optimizer."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor, nn

from shardstore.config.resolve import RunConfig
from shardstore.dataset.subset import RandomShardSubsetCachedDataset, open_data_store
from shardstore.errors import ConfigError
from shardstore.kd.augment import apply_views
from shardstore.kd.distributed import DistInfo
from shardstore.kd.images import (
    SETTING_KEYS,
    ImageFormat,
    check_channels,
    check_labels,
    check_values,
    image_format,
    network_inputs,
)
from shardstore.kd.losses import DistillationLoss
from shardstore.kd.models.io import InputAdapter, freeze, load_checkpoint_into, load_torchscript
from shardstore.kd.models.registry import build_model
from shardstore.kd.target_spec import TargetSpec, read_target_spec
from shardstore.manifest.shard_size import check_cache_shard_size
from shardstore.store.reader import ShardStore

log = logging.getLogger(__name__)


@dataclass
class Data:
    """The training dataset (this rank's part of each epoch), the evaluation store, and cached targets' settings."""

    train: RandomShardSubsetCachedDataset
    eval_store: ShardStore | None
    held_out_ids: list[int]
    targets: TargetSpec | None = None
    #: the evaluation store also holds the cached targets (in every shard)
    eval_has_targets: bool = False
    #: where the images and labels are and how they are read (the evaluation store's too)
    image_format: ImageFormat = ImageFormat()


def _with_targets(cfg: RunConfig, store: ShardStore, fmt: ImageFormat) -> tuple[ShardStore, TargetSpec]:
    """The training shards that have the cached targets (all of them, or an error, unless missing_targets: skip)."""
    name = cfg.data.teacher_targets
    assert name is not None
    spec = read_target_spec(store.root, name)
    fix = f"`shardstore cache-teacher --name {name}`"
    if spec.num_classes != cfg.model.num_classes:
        raise ConfigError(f"the cached targets {name!r} have {spec.num_classes} classes, model_config.num_classes is "
                          f"{cfg.model.num_classes}; fix num_classes or cache the targets again under a new name")
    if spec.image_field != fmt.image_field:
        raise ConfigError(f"the cached targets {name!r} were made on the field {spec.image_field!r}, data.image_field "
                          f"is {fmt.image_field!r}; set it back, or cache the targets again under a new name")
    if spec.image_shape != fmt.shape:
        raise ConfigError(f"the cached targets {name!r} were made on images {list(spec.image_shape)}, the cache has "
                          f"{list(fmt.shape or ())} (C, H, W); cache them again with {fix}")
    differ = [k for k, v in fmt.settings().items() if spec.image_format.get(k) != v]
    if differ:
        key = differ[0]
        raise ConfigError(f"the cached targets {name!r} were made on images read with {key} "
                          f"{spec.image_format.get(key)!r}, this run reads them with {getattr(fmt, key)!r} "
                          f"(data.{SETTING_KEYS[key]}); set it back, or cache the targets again under a new name")
    have = store.manifest.positions_with(list(spec.field_names().values()))
    if len(have) < store.num_shards:
        missing = sorted(set(int(i) for i in store.shard_ids) - {int(store.shard_ids[p]) for p in have})
        shown = ", ".join(map(str, missing[:8])) + (" ..." if len(missing) > 8 else "")
        what = (f"the cached targets {name!r} cover {len(have)} of the {store.num_shards} training shards of "
                f"{store.root} (missing: {shown})")
        if not len(have):
            raise ConfigError(f"{what}; fill them with {fix}")
        if cfg.data.missing_targets == "error":
            raise ConfigError(f"{what}; fill them with {fix}, or set data.missing_targets: skip to train on the others")
        log.warning("%s; training on those %d shards only (data.missing_targets: skip)", what, len(have))
        store = store.subset(have)
    return store, spec


def _held_out_positions(cfg: RunConfig, store: ShardStore, recorded: list[int] | None) -> list[int]:
    """Positions of the evaluation shards: the run's recorded ones (by id) or, in a new run, the last N."""
    held = cfg.train.eval.held_out_shards
    if recorded is None:
        if held and held >= store.num_shards:
            raise ConfigError(f"train_config: eval.held_out_shards={held} leaves no training shard "
                              f"(the cache has {store.num_shards}); lower it")
        return list(range(store.num_shards - held, store.num_shards)) if held else []
    shown = ", ".join(map(str, recorded[:8])) + (" ..." if len(recorded) > 8 else "")
    if len(recorded) != held:
        raise ConfigError(f"train_config: eval.held_out_shards is {held}, but this run holds out {len(recorded)} "
                          f"shards (ids {shown or 'none'}, recorded in its checkpoint); set it back to "
                          f"{len(recorded)}, or start a new run in another train.run_dir")
    where = {int(i): p for p, i in enumerate(store.shard_ids)}
    missing = [i for i in recorded if i not in where]
    if missing:
        raise ConfigError(f"the run's held-out shards (ids {shown}, recorded in its checkpoint) are not all in "
                          f"{store.root}: shard {missing[0]} is missing; restore it, or start a new run in "
                          "another train.run_dir")
    if len(recorded) >= store.num_shards:
        raise ConfigError(f"train_config: eval.held_out_shards={held} leaves no training shard "
                          f"(the cache has {store.num_shards}); lower it")
    return sorted(where[i] for i in recorded)


def build_data(cfg: RunConfig, info: DistInfo, *, held_out_ids: list[int] | None = None) -> Data:
    """Open the cache; hold out shards for evaluation (by id) or open the evaluation cache.

    A new run holds out the cache's last ``eval.held_out_shards`` shards; a resumed one passes
    the ids it recorded (``held_out_ids``), so shards added since then never move the split.
    The loader reads only the fields training uses: images, labels, the logits of
    ``loss.target_field`` and, with ``data.teacher_targets``, the cached targets.
    """
    if cfg.train.loss.target_field and cfg.data.teacher_targets:
        raise ConfigError(f"train_config: loss.target_field ({cfg.train.loss.target_field}) and data_config: "
                          f"teacher_targets ({cfg.data.teacher_targets}) both name cached teacher outputs; keep one")
    store = open_data_store(cfg.data)
    check_cache_shard_size(store, cfg.data.cache_shard_size)
    fmt, store = image_format(cfg.data, store)
    check_networks(cfg, fmt)
    target = cfg.train.loss.target_field
    if target and target not in store.fields:
        raise ConfigError(f"the cache {store.root} has no field {target!r} (it has {', '.join(sorted(store.fields))}); "
                          "set train.loss.target_field to the field of cached teacher logits, or write it")
    needed = [fmt.image_field, fmt.label_field] + ([target] if target else [])
    eval_store, held_ids = None, []
    held_positions = _held_out_positions(cfg, store, held_out_ids)
    if held_positions:
        held_ids = [int(store.shard_ids[p]) for p in held_positions]
        eval_store = store.subset(held_positions)
        store = store.subset(sorted(set(range(store.num_shards)) - set(held_positions)))
    elif cfg.train.eval.cache_root:
        eval_fmt, eval_store = image_format(cfg.data, ShardStore.open(cfg.train.eval.cache_root))
        if eval_fmt.settings() != fmt.settings() or eval_fmt.channels != fmt.channels:
            raise ConfigError(f"the evaluation cache {eval_store.root} holds {eval_fmt.dtype} {eval_fmt.layout} images "
                              f"of {eval_fmt.channels} channels, the training cache {fmt.dtype} {fmt.layout} of "
                              f"{fmt.channels}; write both the same way (train.eval.cache_root)")
    # Before the first step: labels against num_classes (from the manifest), and a few images against the scale.
    for part in (store, eval_store):
        if part is not None:
            check_labels(part, fmt, cfg.model.num_classes)
    fmt = replace(fmt, num_classes=cfg.model.num_classes)  # and every batch as it is read (kd/images.py)
    check_values(store, fmt)
    spec, eval_has_targets = None, False
    if cfg.data.teacher_targets:
        store, spec = _with_targets(cfg, store, fmt)
        target_fields = list(spec.field_names().values())
        # Evaluation compares with the stored targets when every evaluation shard has them (cache-teacher fills all).
        eval_has_targets = eval_store is not None and all(f in eval_store.fields for f in target_fields)
        needed += target_fields
    if eval_store is not None:
        eval_store = eval_store.select([f for f in needed if f in eval_store.fields])
    store = store.select(needed)
    return Data(train_dataset(cfg, store, info, held_out_ids=held_ids), eval_store, held_ids, spec, eval_has_targets,
                fmt)


def check_networks(cfg: RunConfig, fmt: ImageFormat) -> None:
    """The student, and the teacher if the run uses one, take the images' channels (one line naming the key if not)."""
    check_channels(fmt, cfg.model.student, "student", cfg.data)
    if teacher_needed(cfg):
        check_channels(fmt, cfg.model.teacher, "teacher", cfg.data)


def train_dataset(cfg: RunConfig, store: ShardStore, info: DistInfo, *,
                  held_out_ids: list[int] | None = None) -> RandomShardSubsetCachedDataset:
    """The shard-epoch dataset over ``store`` with the run's epoch settings (this rank's part of each epoch).

    With ``data.refresh_manifest`` it re-reads the manifest at each epoch; the held-out shards never join.
    """
    d = cfg.data
    return RandomShardSubsetCachedDataset(
        store, d.shards_per_epoch, d.random_subset_seed, d.shard_policy, order=d.sample_order,
        active_shards=d.active_shards, batch_size=cfg.train.batch_size,
        max_steps_per_epoch=cfg.train.max_steps_per_epoch, rank=info.rank, world_size=info.world_size,
        refresh_manifest=d.refresh_manifest, held_out_ids=held_out_ids)


def missing_shards(store: ShardStore, shard_ids: np.ndarray) -> list[int]:
    """The ids among ``shard_ids`` that ``store`` does not have."""
    return [int(i) for i in np.setdiff1d(np.asarray(shard_ids, dtype=np.int64), store.shard_ids)]


def restrict_to_shards(store: ShardStore, shard_ids: np.ndarray) -> ShardStore:
    """``store`` with only the shards ``shard_ids`` (all of which it must have; see ``missing_shards``)."""
    return store.subset(np.flatnonzero(np.isin(store.shard_ids, np.asarray(shard_ids, dtype=np.int64))))


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
            torch.manual_seed(cfg.train.seed)
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


def amp_enabled(cfg: RunConfig, device: torch.device) -> bool:
    """Whether teacher and student run under bf16 autocast: ``train.amp`` bf16, or auto on CUDA."""
    return cfg.train.amp == "bf16" or (cfg.train.amp == "auto" and device.type == "cuda")


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


def build_optimizer(cfg: RunConfig, module: nn.Module, lr: float) -> torch.optim.Optimizer:
    """AdamW or SGD; no weight decay on biases and normalisation weights (1-D parameters)."""
    decay = [p for p in module.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in module.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if cfg.train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.train.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=lr)
