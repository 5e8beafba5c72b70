"""Teacher outputs cached next to the images: K replayable views per sample, sparse or dense logits, embeddings.

``fill_teacher_cache`` draws ``K`` augmentation views for every sample of a shard from
``(seed, shard id)`` alone, runs the frozen teacher on each view rendered at the teacher's
input size, and adds a field group (``ROOT/<name>.fields.json``) to the shard:

==========================  =================  ==============================================
field                       dtype, per sample  what
==========================  =================  ==============================================
``<name>_views``            int16 ``[K, 5]``   the view: top, left, crop_h, crop_w, flip (pixels)
``<name>_topk_index``       int16 ``[K, k]``   the k most likely classes (int32 above 32,768)
``<name>_topk_logp``        float16 ``[K, k]`` their log-probabilities at temperature 1
``<name>_tail_logp``        float16 ``[K]``    log of the probability of all other classes
``<name>_logits``           float16 ``[K, C]`` instead of the three above, with ``dense=True``
``<name>_embedding``        float16 ``[K, D]`` the teacher's pooled features (``embeddings=True``)
==========================  =================  ==============================================

A shard is filled whole or not at all (see ``shardstore.store.groups``): a run that is killed
leaves finished shards as they are, and the next run fills only the shards that lack the
group, which is also how a cache that is still growing gets its new shards. Training reads
the group (``data.teacher_targets``), picks one of the K views per sample and step, replays
that view exactly for the student, and needs no teacher; ``check_teacher_cache`` recomputes
a sample of the stored targets with the live teacher to prove the replay is exact.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from shardstore.config.resolve import RunConfig
from shardstore.errors import ConfigError, ManifestError, ShardstoreError
from shardstore.kd import distributed
from shardstore.kd.autocast import autocast_for
from shardstore.kd.images import ImageFormat, check_channels, check_values, image_format
from shardstore.kd.models.io import InputAdapter
from shardstore.kd.target_spec import SAME_SETTINGS, TargetSpec, read_target_spec, shard_views
from shardstore.kd.targets import encode_topk
from shardstore.kd.teacher import TEACHER_KEYS, load_teacher, render_teacher_input, teacher_forward, teacher_identity
from shardstore.manifest.build import build_manifest
from shardstore.store.groups import (
    add_shard_fields,
    check_group_name,
    group_file,
    read_group_specs,
    remove_group,
    remove_stale_declaration_temporaries,
    remove_stale_temporaries,
    write_group_spec,
)
from shardstore.store.layout import is_within
from shardstore.store.reader import ShardStore

log = logging.getLogger(__name__)


@dataclass
class FillReport:
    spec: TargetSpec
    shards_filled: list[int] = field(default_factory=list)
    shards_present: int = 0
    images: int = 0
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0


@torch.no_grad()
def _teacher_targets(teacher: InputAdapter, spec: TargetSpec, images: Tensor, views: Tensor, amp: Any,
                     dtype: torch.dtype) -> dict[str, Tensor]:
    """Teacher outputs (on the device) for images ``[n, C, H, W]`` (``ImageFormat.images``) x views ``[n, K, 5]``."""
    n, k = views.shape[:2]
    flat_images = images.repeat_interleave(k, dim=0)
    x = render_teacher_input(flat_images, views.reshape(n * k, 5).to(images.device), teacher)
    with amp:
        logits, features = teacher_forward(teacher, x.to(dtype), features=spec.embedding_dim > 0)
    out: dict[str, np.ndarray] = {}
    if spec.logits == "topk":
        sparse = encode_topk(logits, spec.topk)
        out |= {"index": sparse.indices.view(n, k, -1), "logp": sparse.log_probs.view(n, k, -1),
                "tail": sparse.tail_log_mass.view(n, k)}
    elif spec.logits == "dense":
        out["logits"] = logits.to(torch.float16).view(n, k, -1)
    if features is not None:
        out["embedding"] = features.to(torch.float16).view(n, k, -1)
    return out


def new_target_spec(cfg: RunConfig, store: ShardStore, teacher: InputAdapter, *, name: str, views: int, topk: int,
                    dense: bool, embeddings: bool, seed: int, device: torch.device, logits: bool = True) -> TargetSpec:
    if views < 1:
        raise ConfigError(f"--views must be at least 1, got {views}")
    fmt, readable = image_format(cfg.data, store, labels=False)
    check_channels(fmt, cfg.model.teacher, "teacher", cfg.data)
    check_values(readable, fmt)
    assert fmt.shape is not None
    num_classes = cfg.model.num_classes
    mode = "dense" if dense else "topk" if logits else "none"
    if mode == "topk" and not 1 <= topk <= num_classes:
        raise ConfigError(f"--topk must be between 1 and the {num_classes} classes, got {topk}")
    if mode == "none" and not embeddings:
        raise ConfigError("nothing to cache: --no-logits without --embeddings; keep one of them")
    a = cfg.train.augment
    return TargetSpec(
        name=name, views=views, logits=mode, topk=topk if mode == "topk" else 0, num_classes=num_classes,
        embedding_dim=teacher.num_features if embeddings else 0, seed=seed,
        augment={"random_resized_crop": a.random_resized_crop, "scale": list(a.scale), "ratio": list(a.ratio),
                 "flip": a.flip},
        image_field=fmt.image_field, image_shape=fmt.shape, teacher=teacher_identity(cfg, device),
        image_format=fmt.settings())


def _agree_with_existing(new: TargetSpec, old: TargetSpec, source: Path) -> None:
    new_d, old_d = asdict(new), asdict(old)
    new_d["teacher"] = {k: new.teacher.get(k) for k in TEACHER_KEYS}
    old_d["teacher"] = {k: old.teacher.get(k) for k in TEACHER_KEYS}
    differ = [key for key in SAME_SETTINGS if new_d[key] != old_d[key]]
    if differ:
        key = differ[0]
        if key == "teacher":
            inner = next(k for k in TEACHER_KEYS if new_d[key][k] != old_d[key][k])
            key, old_value, new_value = f"teacher.{inner}", old_d["teacher"][inner], new_d["teacher"][inner]
        else:
            old_value, new_value = old_d[key], new_d[key]
        raise ConfigError(f"{source} holds targets made with {key}={old_value!r}, this run has {new_value!r}; "
                          f"use another --name, or --overwrite to replace them")
    if new.teacher.get("precision") != old.teacher.get("precision"):
        log.warning("%s: earlier shards were filled in %s, these in %s (targets differ by rounding only)", source,
                    old.teacher.get("precision"), new.teacher.get("precision"))


def fill_teacher_cache(cfg: RunConfig, *, name: str = "teacher", views: int = 4, topk: int = 10, dense: bool = False,
                       embeddings: bool = False, logits: bool = True, seed: int | None = None, batch_size: int = 256,
                       device: str | torch.device | None = None, fsync: bool = True, overwrite: bool = False,
                       progress: Callable[[int], None] | None = None,
                       on_shard: Callable[[int], None] | None = None,
                       on_plan: Callable[[int], None] | None = None) -> FillReport:
    """Add teacher targets to every shard of ``cfg.data.cache_root`` that lacks them, then rebuild the manifest.

    ``on_plan`` gets the number of images to fill once it is known, ``progress`` the number
    finished after each batch, ``on_shard`` the id of each shard written. ``seed`` defaults
    to ``cfg.train.seed``. Targets already stored under ``name`` must have been made with the
    same settings and teacher, unless ``overwrite`` deletes them first. ``report.seconds``
    covers the whole call (loading the teacher and rebuilding the manifest included).

    Under torchrun every process calls it: rank 0 prepares the group, each rank fills every
    ``world_size``-th of the shards that lack it on its own device (``cuda:LOCAL_RANK``), and
    rank 0 rebuilds the manifest; the report counts all ranks. The result does not depend on
    the number of processes: a shard's views come from its id alone.
    """
    start = time.perf_counter()
    check_group_name(name)  # before the teacher is loaded: the name becomes file names in the cache
    owns_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    info = distributed.setup(None if device is None else str(device))
    try:
        teacher = load_teacher(cfg, info.device)
        spec = _prepare_group(cfg, info, teacher, name=name, views=views, topk=topk, dense=dense,
                              embeddings=embeddings, logits=logits, seed=cfg.train.seed if seed is None else seed,
                              overwrite=overwrite)
        root = Path(cfg.data.cache_root)
        fmt, store = image_format(cfg.data, ShardStore.open(root), labels=False)
        names = spec.field_names()
        have = np.zeros(store.num_shards, bool)
        have[store.manifest.positions_with(list(names.values()))] = True
        todo = np.flatnonzero(~have).tolist()
        mine = todo[info.rank::info.world_size]
        if on_plan is not None:
            on_plan(int(store.counts[mine].sum()))
        filled, images = [], 0
        for position in mine:
            entry = store.shards[position]
            images += _fill_shard(cfg, info.device, teacher, spec, store, fmt, position, batch_size, fsync, progress)
            filled.append(entry.id)
            if on_shard is not None:
                on_shard(entry.id)
        report = FillReport(spec, shards_present=store.num_shards - len(todo))
        for ids, count in distributed.gather_objects((filled, images), info):
            report.shards_filled += ids
            report.images += count
        report.shards_filled.sort()
        if info.is_main:
            build_manifest(root)
        distributed.barrier(info)
    finally:
        if owns_group:
            distributed.teardown(info)
    report.seconds = time.perf_counter() - start
    return report


def _prepare_group(cfg: RunConfig, info: distributed.DistInfo, teacher: InputAdapter, *, name: str,
                   overwrite: bool, **settings: Any) -> TargetSpec:
    """On rank 0: the manifest brought up to date and the group declared (or checked); its settings on every rank."""
    root = Path(cfg.data.cache_root)
    error: str | None = None
    spec: TargetSpec | None = None
    if info.is_main:
        try:
            remove_stale_declaration_temporaries(root)  # of earlier runs that were killed
            build_manifest(root)  # picks up shards written since the last build
            store = ShardStore.open(root)
            spec = new_target_spec(cfg, store, teacher, name=name, device=info.device, **settings)
            source = group_file(root, name)
            if overwrite and source.exists():
                removed = remove_group(root, name)
                log.info("removed %d files of the earlier targets %r", removed, name)
            if source.exists():
                _agree_with_existing(spec, read_target_spec(root, name), source)
            else:
                taken = {f: g.name for g in read_group_specs(root).values() for f in g.fields}
                taken |= {f: None for f, s in store.all_fields.items() if s.group is None}
                clash = [f for f in spec.field_specs() if f in taken]
                if clash:
                    owner = "a field of the cache itself" if taken[clash[0]] is None else \
                        f"a field of group {taken[clash[0]]!r}"
                    raise ConfigError(f"field {clash[0]!r} is already {owner} in {root}; choose another --name")
                write_group_spec(root, spec.to_group())
                build_manifest(root)  # the new declaration decides which files are the group's
        except ShardstoreError as exc:
            if not info.distributed:
                raise
            error = str(exc)
    error, spec = distributed.broadcast_object((error, spec), info)
    if error is not None:
        raise ConfigError(error)
    assert spec is not None
    return spec


def _fill_shard(cfg: RunConfig, device: torch.device, teacher: InputAdapter, spec: TargetSpec, store: ShardStore,
                fmt: ImageFormat, position: int, batch_size: int, fsync: bool,
                progress: Callable[[int], None] | None) -> int:
    """Compute and write the group's files of one shard; returns its number of images."""
    entry = store.shards[position]
    names = spec.field_names()
    targets = {f: store.root / entry.field_path(f) for f in names.values()}
    directory = next(iter(targets.values())).parent
    if directory != store.root and (directory.is_symlink() or not is_within(os.path.realpath(store.root), directory)):
        raise ManifestError(f"{directory} is a symbolic link (or leads outside {store.root}); cache-teacher writes "
                            "only into the cache's own shard directories: replace the link with the directory itself")
    remove_stale_temporaries(directory)
    amp = autocast_for(cfg, device)
    dtype = next(teacher.parameters()).dtype
    per_batch = max(1, batch_size // spec.views)
    shard_v = shard_views(spec, entry.id, entry.num_samples)
    parts: dict[str, list[Tensor]] = {}  # kept on the device: one copy back per shard, no sync per batch
    for lo in range(0, entry.num_samples, per_batch):
        hi = min(lo + per_batch, entry.num_samples)
        batch = fmt.images(torch.from_numpy(store.read(position, fmt.image_field, slice(lo, hi))).to(device))
        for role, arr in _teacher_targets(teacher, spec, batch, shard_v[lo:hi], amp, dtype).items():
            parts.setdefault(role, []).append(arr)
        if progress is not None:
            progress(hi - lo)
    arrays = {names[role]: torch.cat(chunks).cpu().numpy() for role, chunks in parts.items()}
    arrays[names["views"]] = shard_v.numpy().astype(spec.field_specs()[names["views"]][0])
    add_shard_fields(targets, arrays, fsync=fsync)
    return entry.num_samples
