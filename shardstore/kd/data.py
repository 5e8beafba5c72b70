"""The run's data, built from the configs: the training dataset, the evaluation store, the cached targets' settings."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np

from shardstore.config.resolve import RunConfig
from shardstore.dataset.subset import RandomShardSubsetCachedDataset, open_data_store
from shardstore.errors import ConfigError
from shardstore.kd.distributed import DistInfo
from shardstore.kd.images import (
    SETTING_KEYS,
    ImageFormat,
    check_channels,
    check_labels,
    check_values,
    image_format,
)
from shardstore.kd.target_spec import TargetSpec, read_target_spec
from shardstore.kd.teacher import teacher_needed
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
        store, **d.epoch_settings(), batch_size=cfg.train.batch_size,
        max_steps_per_epoch=cfg.train.max_steps_per_epoch, rank=info.rank, world_size=info.world_size,
        refresh_manifest=d.refresh_manifest, held_out_ids=held_out_ids)


def missing_shards(store: ShardStore, shard_ids: np.ndarray) -> list[int]:
    """The ids among ``shard_ids`` that ``store`` does not have."""
    return [int(i) for i in np.setdiff1d(np.asarray(shard_ids, dtype=np.int64), store.shard_ids)]


def restrict_to_shards(store: ShardStore, shard_ids: np.ndarray) -> ShardStore:
    """``store`` with only the shards ``shard_ids`` (all of which it must have; see ``missing_shards``)."""
    return store.subset(np.flatnonzero(np.isin(store.shard_ids, np.asarray(shard_ids, dtype=np.int64))))
