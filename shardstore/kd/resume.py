"""Resuming a run: which checkpoint it continues from, on which shards an interrupted epoch goes on, and how
the settings a resume changed (``shardstore.kd.run_changes``) are applied to the restored optimizer and schedule.

The split is part of a run's state: a checkpoint records the held-out shards and the training
shards its epoch draws from, by id. A cache that grew since keeps both: the held-out shards stay
the evaluation set, the interrupted epoch finishes on the shards it was drawn from (so its
batches are the ones it would have had), and new shards join from the next epoch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.optim.lr_scheduler import LambdaLR

from shardstore.config.resolve import RunConfig
from shardstore.errors import ConfigError
from shardstore.kd.checkpoint import CheckpointManager, load_checkpoint
from shardstore.kd.data import missing_shards, restrict_to_shards
from shardstore.kd.run_changes import ResumeChanges
from shardstore.kd.schedule import warmup_cosine
from shardstore.store.reader import ShardStore


def checkpoint_to_resume(ckpt: CheckpointManager, resume: str | Path | bool | None,
                         ) -> tuple[Path | None, dict[str, Any] | None]:
    """The checkpoint ``resume`` names and its state, or ``(None, None)`` to start fresh.

    ``resume``: a checkpoint path; True for the run directory's latest (an error when it has none:
    a mistyped ``train.run_dir`` must not train from scratch); ``"auto"`` for the latest if there
    is one, else a fresh start (a batch job that is requeued runs the same command every time).
    A fresh start into a run directory that holds checkpoints is refused: it would mix two runs.
    """
    if resume == "auto":
        resume = ckpt.latest_pointer_exists()
    if not resume:
        if ckpt.latest_pointer_exists():
            raise ConfigError(f"{ckpt.run_dir} holds checkpoints of an earlier run; continue it with --resume, "
                              "or choose a new train.run_dir (or delete its checkpoints/ folder)")
        return None, None
    path = ckpt.latest() if resume is True else Path(resume)
    if path is None:
        raise ConfigError(f"--resume: train.run_dir {ckpt.run_dir} holds no checkpoint ({ckpt.dir / 'latest.json'} "
                          "does not exist); check train.run_dir, or start without --resume (--auto-resume starts "
                          "fresh when there is none)")
    return path, load_checkpoint(path)


def held_out_ids(state: dict[str, Any] | None) -> list[int] | None:
    """The shard ids a resumed run evaluates on (None for a new run or a checkpoint that predates the record)."""
    split = (state or {}).get("split")
    return None if split is None else [int(i) for i in split["held_out_ids"].tolist()]


def split_record(held_out: list[int], training: ShardStore) -> dict[str, Any]:
    """What a checkpoint records of the split: the held-out ids and the ids the epoch's shards are drawn from."""
    return {"held_out_ids": torch.tensor(held_out, dtype=torch.int64),
            "train_shard_ids": torch.from_numpy(np.array(training.shard_ids, dtype=np.int64))}


def epoch_store(store: ShardStore, state: dict[str, Any], *, ckpt: CheckpointManager, source: Path) -> ShardStore:
    """The store the interrupted epoch of ``state`` continues on: ``store``, or its shards the epoch was drawn from.

    ``ConfigError`` when that is impossible (a shard of the epoch is gone or changed), naming
    the flag that resumes from an earlier end-of-epoch checkpoint instead.
    """
    epoch = int(state["epoch"])
    split = state.get("split")
    if split is not None:
        recorded = split["train_shard_ids"].numpy()
        if not np.array_equal(recorded, store.shard_ids):
            missing = missing_shards(store, recorded)
            if missing:
                raise _cannot_continue(ckpt, source, epoch, f"its shard {missing[0]} is no longer in the cache")
            store = restrict_to_shards(store, recorded)
    saved = state["sampler"].get("plan_id") or ""
    now = store.manifest.plan_id()
    if saved != now:  # "" : a checkpoint from before plan ids, whose snapshot ids are computed differently
        raise _cannot_continue(ckpt, source, epoch, f"the cache changed under it (shard list {saved or 'unknown'} "
                                                    f"-> {now})")
    return store


def _cannot_continue(ckpt: CheckpointManager, source: Path, epoch: int, reason: str) -> ConfigError:
    before = ckpt.epoch_before(epoch)
    how = (f"resume from the end of an earlier epoch instead with --resume-from {before} (the epochs after it "
           "run on the cache as it is now)" if before is not None else
           "no end-of-epoch checkpoint precedes it: start again in a new train.run_dir")
    return ConfigError(f"{source}: cannot continue epoch {epoch + 1} where it stopped: {reason}; {how}")


def apply_changes(changes: ResumeChanges, cfg: RunConfig, optimizer: torch.optim.Optimizer, scheduler: LambdaLR, *,
                  lr: float, total_steps: int, updates_left: int) -> tuple[LambdaLR, int, str]:
    """Give the restored ``optimizer`` and ``scheduler`` the resumed run's settings.

    ``lr`` is the resumed run's peak (scaled) lr; ``updates_left`` the optimizer updates from now to the end under
    the new settings. A changed length recomputes the schedule's total (``global step + updates_left``): from the
    current update on the lr is what a run started with these settings would use there (no new warmup, no restart).
    Returns the scheduler, its total and a note for the resume line.
    """
    t = cfg.train
    update = scheduler.last_epoch  # optimizer updates so far
    note = ""
    if changes.schedule_changed:
        new_total = max(1, update + updates_left)
        rebuilt = warmup_cosine(optimizer, total_steps=new_total, warmup_steps=min(t.warmup_steps, new_total),
                                min_lr_ratio=t.min_lr_ratio)
        rebuilt.last_epoch, rebuilt.base_lrs = update, list(scheduler.base_lrs)
        scheduler = rebuilt
        note = f"; the lr schedule now ends at update {new_total:,} (was {total_steps:,}) and continues at {update:,}"
        total_steps = new_total
    if changes.has("train.lr", "train.base_batch_size"):
        scheduler.base_lrs = [lr] * len(optimizer.param_groups)
        for group in optimizer.param_groups:
            group["initial_lr"] = lr
    if changes.has("train.weight_decay"):
        optimizer.param_groups[0]["weight_decay"] = t.weight_decay  # group 1 holds biases and norms: no decay
    if changes.has("train.momentum") and isinstance(optimizer, torch.optim.SGD):
        for group in optimizer.param_groups:
            group["momentum"] = t.momentum
    factor = scheduler.lr_lambdas[0](update)
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = base * factor
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # what get_last_lr() reports
    return scheduler, total_steps, note
