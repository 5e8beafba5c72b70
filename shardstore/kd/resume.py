"""Resuming a run: which checkpoint it continues from, and on which shards an interrupted epoch goes on.

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

from shardstore.errors import ConfigError
from shardstore.kd.checkpoint import CheckpointManager, load_checkpoint
from shardstore.kd.components import missing_shards, restrict_to_shards
from shardstore.manifest.reader import ShardStore


def checkpoint_to_resume(ckpt: CheckpointManager, resume: str | Path | bool | None,
                         ) -> tuple[Path | None, dict[str, Any] | None]:
    """The checkpoint ``resume`` names (a path, or True / "auto" for the latest) and its state; ``(None, None)`` to
    start fresh. A fresh start into a run directory that holds checkpoints is refused: it would mix two runs."""
    if not resume:
        if ckpt.latest_pointer_exists():
            raise ConfigError(f"{ckpt.run_dir} holds checkpoints of an earlier run; continue it with --resume, "
                              "or choose a new train.run_dir (or delete its checkpoints/ folder)")
        return None, None
    path = ckpt.latest() if resume is True or resume == "auto" else Path(resume)
    if path is None:
        return None, None
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
    saved, now = state["sampler"].get("snapshot_id"), store.snapshot_id
    if saved != now:
        raise _cannot_continue(ckpt, source, epoch, f"the cache changed under it (manifest snapshot {saved} -> {now})")
    return store


def _cannot_continue(ckpt: CheckpointManager, source: Path, epoch: int, reason: str) -> ConfigError:
    before = ckpt.epoch_before(epoch)
    how = (f"resume from the end of an earlier epoch instead with --resume-from {before} (the epochs after it "
           "run on the cache as it is now)" if before is not None else
           "no end-of-epoch checkpoint precedes it: start again in a new train.run_dir")
    return ConfigError(f"{source}: cannot continue epoch {epoch + 1} where it stopped: {reason}; {how}")
