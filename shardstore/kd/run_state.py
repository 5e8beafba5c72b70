"""A training run's state: what a checkpoint holds, how a resume restores it, and where the run stands.

``RunState`` is the part of the training loop (``shardstore.kd.trainer._Run``) that moves state in
and out of checkpoints; it reads and sets the loop's attributes declared below.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import torch

from shardstore.config.resolve import RunConfig, run_config_to_yaml
from shardstore.kd import distributed
from shardstore.kd.checkpoint import CheckpointManager
from shardstore.kd.data import train_dataset
from shardstore.kd.ema import ModelEma
from shardstore.kd.metrics import EpochTally
from shardstore.kd.preempt import RecoveryTrigger, StopPoint
from shardstore.kd.resume import apply_changes, epoch_store, split_record
from shardstore.kd.run_changes import ResumeChanges, describe_applied
from shardstore.loader import ShardLoader


class RunState:
    """Checkpoint state in and out of a run, and the run's position (epoch, step, samples) for its messages."""

    cfg: RunConfig
    info: distributed.DistInfo
    device: torch.device
    ckpt: CheckpointManager
    data: Any
    student: torch.nn.Module
    criterion: torch.nn.Module
    ema: ModelEma | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    loader: ShardLoader
    active: ShardLoader
    resume_loader: ShardLoader | None
    resume_path: Path | None
    resume_point: StopPoint | None
    changes: ResumeChanges | None
    recovery: RecoveryTrigger
    tally: EpochTally
    epoch_started: float
    global_step: int
    samples_seen: int
    global_batch: int
    accum: int
    lr: float
    total_steps: int
    updates_per_epoch: int
    best: float | None
    best_epoch: int | None
    teacher_top1: float | None

    def _make_loader(self, dataset: Any, *, prepare_next_epoch: bool = True) -> ShardLoader:
        raise NotImplementedError

    def _note(self, line: str) -> None:
        raise NotImplementedError

    def state(self, epoch: int, epoch_complete: bool) -> dict[str, Any]:
        """Everything a resumed run needs, as plain values and CPU tensors (loadable with ``weights_only=True``)."""
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        # The split is part of the run: the held-out shards, and the training shards this epoch draws from.
        split = split_record(self.data.held_out_ids, self.active.dataset.store)
        tally = None if epoch_complete else self.tally.state_dict(time.perf_counter() - self.epoch_started)
        return {
            "student": self.student.state_dict(), "criterion": self.criterion.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None, "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "rng": rng,
            "sampler": self.active.state_dict(), "epoch": epoch, "epoch_complete": epoch_complete,
            "global_step": self.global_step, "best": self.best, "best_epoch": self.best_epoch,
            "teacher_top1": self.teacher_top1, "split": split, "tally": tally, "total_steps": self.total_steps,
            "samples_seen": self.samples_seen, "config": run_config_to_yaml(self.cfg),
        }

    def restore(self, state: dict[str, Any]) -> int:
        """Load a checkpoint; returns the epoch to continue (the sampler is positioned inside it if needed)."""
        self.student.load_state_dict(state["student"])
        self.criterion.load_state_dict(state["criterion"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.global_step, self.best = int(state["global_step"]), state["best"]
        self.recovery.saved(self.global_step)
        self.samples_seen = int(state.get("samples_seen", self.global_step * self.global_batch))
        self.best_epoch = state.get("best_epoch")
        self.teacher_top1 = state.get("teacher_top1")
        if self.info.is_main:
            self.ckpt.restore_best(self.best_epoch)  # a best.pt copy that a full disk interrupted is made now
        epoch = int(state["epoch"])
        if not state["epoch_complete"]:
            self._continue_epoch(state)
        assert self.changes is not None
        self.resume_point = self.stop_point(epoch, state["epoch_complete"])
        self._note(f"resuming from {self.resume_path}: {self.resume_point.describe()}")
        if self.changes.applied:  # the loader is positioned: the updates left in this epoch are known
            updates_left = 0 if state["epoch_complete"] else -(-len(self.active) // self.accum)
            planned = self.cfg.train.epochs - epoch - 1  # whole epochs after this one
            self.scheduler, self.total_steps, schedule_note = apply_changes(
                self.changes, self.cfg, self.optimizer, self.scheduler, lr=self.lr, total_steps=self.total_steps,
                updates_left=updates_left + planned * self.updates_per_epoch)
            self._note(f"resuming with changed settings: {describe_applied(self.changes)}{schedule_note}")
        return epoch + 1 if state["epoch_complete"] else epoch

    def stop_point(self, epoch: int, epoch_complete: bool) -> StopPoint:
        """Where the run is now: after ``epoch``, or inside it at the active loader's position."""
        if epoch_complete:
            return StopPoint(epoch, self.cfg.train.epochs, 0, 0, self.global_step, self.samples_seen, True)
        ds = self.active.dataset
        done = self.active.state_dict()["samples_consumed"] // ds.global_batch
        return StopPoint(epoch, self.cfg.train.epochs, done, ds.steps_per_epoch, self.global_step, self.samples_seen,
                         False)

    def _continue_epoch(self, state: dict[str, Any]) -> None:
        """Position a loader at the exact next batch of the interrupted epoch, on the shards it was drawn from.

        Shards added to the cache since the checkpoint join from the next epoch on (see ``shardstore.kd.resume``).
        """
        store = epoch_store(self.data.train.store, state, ckpt=self.ckpt, source=self.resume_path or Path())
        if store is not self.data.train.store:
            self.resume_loader = self._make_loader(train_dataset(self.cfg, store, self.info,
                                                                 held_out_ids=self.data.held_out_ids),
                                                   prepare_next_epoch=False)
            self.active = self.resume_loader
        self.active.load_state_dict(state["sampler"])  # continue at the exact next batch
        self.tally = EpochTally.from_state(state.get("tally"), self.device)
