"""The distillation loop: shard epochs in, a student closer to its teacher out; resumable at the exact next batch."""

from __future__ import annotations

import hashlib
import json
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from shardstore.config.resolve import RunConfig, run_config_to_yaml
from shardstore.errors import ConfigError
from shardstore.kd import distributed
from shardstore.kd.checkpoint import CheckpointManager, load_checkpoint
from shardstore.kd.augment import AugmentSpec, DeviceAugment, apply_views, view_generator
from shardstore.kd.components import (
    IMAGE_FIELD, LABEL_FIELD, Trainable, amp_enabled, build_criterion, build_data, build_optimizer, build_student,
    build_teacher, render_teacher_input, teacher_forward,
)
from shardstore.kd.target_spec import CachedTargets
from shardstore.kd.ema import ModelEma
from shardstore.kd.evaluate import evaluate
from shardstore.kd.metrics import MetricsLog
from shardstore.kd.schedule import scaled_lr, warmup_cosine
from shardstore.loader import ShardLoader
from shardstore.store.atomic import write_bytes_atomic


class Reporter(Protocol):
    """What a front end shows while training (the CLI draws a rich progress bar); every method is optional work."""

    def epoch_start(self, epoch: int, epochs: int, shards: list[int], steps: int) -> None: ...
    def step(self, epoch: int, step: int, values: dict[str, float]) -> None: ...
    def epoch_end(self, epoch: int, values: dict[str, Any]) -> None: ...


class _Silent:
    def epoch_start(self, epoch: int, epochs: int, shards: list[int], steps: int) -> None:
        pass

    def step(self, epoch: int, step: int, values: dict[str, float]) -> None:
        pass

    def epoch_end(self, epoch: int, values: dict[str, Any]) -> None:
        pass


@dataclass
class TrainResult:
    run_dir: Path
    global_step: int
    epochs_done: int
    last_eval: dict[str, float] = field(default_factory=dict)
    weights_sha256: str = ""


def _view_seed(seed: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, rank, 0x56494557]).generate_state(1)[0])


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 of a module's parameters and buffers, in state-dict order (equal weights, equal digest)."""
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class _Run:
    def __init__(self, cfg: RunConfig, info: distributed.DistInfo, reporter: Reporter) -> None:
        self.cfg, self.info, self.reporter = cfg, info, reporter
        t = cfg.train
        self.device = info.device
        torch.manual_seed(t.seed)  # the same initial weights on every rank
        self.data = build_data(cfg, info)
        self.teacher = build_teacher(cfg, self.device)
        self.teacher_dtype = next(self.teacher.parameters()).dtype if self.teacher is not None else None
        student = build_student(cfg)
        self.criterion = build_criterion(cfg, student, self.teacher, self.data.targets)
        self.cached = None
        if self.data.targets is not None:
            # Which stored view each sample trains on: from (seed, rank, epoch, batch), like fresh views.
            self.cached = CachedTargets(self.data.targets, _view_seed(t.seed, info.rank),
                                        temperature=t.loss.temperature, tail=t.loss.sparse_tail)
        # Hybrid teaching: whether a step is taught live is the same on every rank (rank-free seed).
        self.live_seed = int(np.random.SeedSequence([t.seed, 0x4C495645]).generate_state(1)[0])
        self.trainable = Trainable(student, self.criterion).to(self.device)
        if t.channels_last:
            self.trainable = self.trainable.to(memory_format=torch.channels_last)
        self.student = self.trainable.student
        self.ema = ModelEma(self.student, t.ema_decay) if t.ema_decay else None
        self.accum = t.accumulation_steps
        self.global_batch = t.batch_size * info.world_size * self.accum
        self.lr = scaled_lr(t.lr, self.global_batch, t.base_batch_size)
        self.optimizer = build_optimizer(cfg, self.trainable, self.lr)
        updates = -(-self.data.train.steps_per_epoch // self.accum)
        total = max(1, t.epochs * updates)
        self.scheduler = warmup_cosine(self.optimizer, total_steps=total, warmup_steps=min(t.warmup_steps, total),
                                       min_lr_ratio=t.min_lr_ratio)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=False)  # bf16 needs no loss scaling
        wrapped: torch.nn.Module = self.trainable
        if info.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            wrapped = DistributedDataParallel(self.trainable, device_ids=ids)
        self.ddp = wrapped if info.distributed else None
        self.forward = torch.compile(wrapped) if t.compile else wrapped
        self.autocast = amp_enabled(cfg, self.device)
        a = t.augment
        self.augment = DeviceAugment(
            AugmentSpec(size=cfg.model.student.input.size, random_resized_crop=a.random_resized_crop,
                        scale=tuple(a.scale), ratio=tuple(a.ratio), flip=a.flip),
            _view_seed(t.seed, info.rank))
        self.loader = ShardLoader(self.data.train, device=self.device if self.device.type == "cuda" else None,
                                  **cfg.data.loader_kwargs())
        self.run_dir = Path(t.run_dir)
        self.ckpt = CheckpointManager(self.run_dir, keep_last=t.checkpoint.keep_last, keep_best=t.checkpoint.keep_best)
        self.metrics: MetricsLog | None = None
        self.global_step = 0
        self.best: float | None = None
        self.teacher_top1: float | None = None

    # -- state --------------------------------------------------------------------------------

    def state(self, epoch: int, epoch_complete: bool) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "student": self.student.state_dict(), "criterion": self.criterion.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None, "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "rng": rng,
            "sampler": self.loader.state_dict(), "epoch": epoch, "epoch_complete": epoch_complete,
            "global_step": self.global_step, "best": self.best, "teacher_top1": self.teacher_top1,
            "config": run_config_to_yaml(self.cfg),
        }

    def restore(self, state: dict[str, Any]) -> int:
        """Load a checkpoint; returns the epoch to continue (the sampler is positioned inside it if needed)."""
        self.student.load_state_dict(state["student"])
        self.criterion.load_state_dict(state["criterion"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.global_step, self.best = int(state["global_step"]), state["best"]
        self.teacher_top1 = state.get("teacher_top1")
        epoch = int(state["epoch"])
        if state["epoch_complete"]:
            return epoch + 1
        self.loader.load_state_dict(state["sampler"])  # continue at the exact next batch
        return epoch

    # -- the loop -------------------------------------------------------------------------------

    def run(self, resume: str | Path | bool | None) -> TrainResult:
        t = self.cfg.train
        start_epoch, mid_epoch = 0, False
        if not resume and self.ckpt.latest_pointer_exists():
            raise ConfigError(f"{self.run_dir} holds checkpoints of an earlier run; continue it with --resume, or "
                              "choose a new train.run_dir (or delete its checkpoints/ folder)")
        if resume:
            path = self.ckpt.latest() if resume is True or resume == "auto" else Path(resume)
            if path is not None:
                state = load_checkpoint(path)
                start_epoch = self.restore(state)
                mid_epoch = not state["epoch_complete"]
        if self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(self.run_dir / "config.yaml", run_config_to_yaml(self.cfg).encode())
            MetricsLog.truncate(self.run_dir, self.global_step)
            self.metrics = MetricsLog(self.run_dir, tensorboard=t.log.tensorboard)
        last_eval: dict[str, float] = {}
        try:
            for epoch in range(start_epoch, t.epochs):
                if not mid_epoch:
                    self.loader.set_epoch(epoch)
                mid_epoch = False
                self.reporter.epoch_start(epoch, t.epochs, self.data.train.selected_shards, len(self.loader))
                values = self.train_epoch(epoch)
                # One set of running statistics for evaluation, checkpoints and every rank's next epoch.
                distributed.broadcast_buffers(self.student, self.info)
                if self.ema is not None:
                    distributed.broadcast_buffers(self.ema.module, self.info)
                if self.data.eval_store is not None and t.eval.every_epochs and (epoch + 1) % t.eval.every_epochs == 0:
                    last_eval = self.evaluate()
                    values |= {f"eval_{k}": v for k, v in last_eval.items()}
                self.end_epoch(epoch, values, last_eval)
        finally:
            self.loader.close()
            if self.metrics is not None:
                self.metrics.close()
        digest = weights_digest(self.student)
        summary = {"rank": self.info.rank, "global_step": self.global_step, "weights_sha256": digest}
        write_bytes_atomic(self.run_dir / f"final_rank{self.info.rank}.json", json.dumps(summary).encode())
        distributed.barrier(self.info)
        return TrainResult(self.run_dir, self.global_step, t.epochs, last_eval, digest)

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        t, loss_cfg = self.cfg.train, self.cfg.train.loss
        self.trainable.train()
        first = self.data.train.start_batch
        num = len(self.loader)
        started, samples, batches = time.perf_counter(), 0, 0
        sums: dict[str, torch.Tensor] = {}
        window_start, window_samples, window_wait = started, 0, self.loader.stats.total_s
        step_parts: dict[str, torch.Tensor] = {}
        amp = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.autocast else nullcontext()
        for i, batch in enumerate(self.loader):
            b = first + i
            images = batch[IMAGE_FIELD].to(self.device, non_blocking=True)
            labels = batch[LABEL_FIELD].to(self.device, non_blocking=True).long()
            # Views (fresh or stored) depend on (seed, rank, epoch, batch) only: a resumed run uses the same ones.
            step = epoch * (1 << 32) + b
            t_logits = t_feats = t_log_probs = None
            if self.cached is not None and not self.live_step(step):
                picked = self.cached.pick({k: v.to(self.device, non_blocking=True) for k, v in batch.items()
                                           if k in self.cached.names.values()}, step)
                x = apply_views(images, picked.views, self.augment.spec.size)
                t_logits, t_log_probs, t_feats = picked.logits, picked.log_probs, picked.features
            else:
                x, views = self.augment(images, step=step)
                if loss_cfg.target_field:
                    t_logits = batch[loss_cfg.target_field].to(self.device).float()
                elif loss_cfg.alpha > 0 or loss_cfg.feature_loss != "none":
                    assert self.teacher is not None
                    tx = x if self.teacher.size == x.shape[-1] else render_teacher_input(images, views, self.teacher)
                    with torch.no_grad(), amp:
                        t_logits, t_feats = teacher_forward(self.teacher, tx.to(self.teacher_dtype),
                                                            features=loss_cfg.feature_loss != "none")
            if t.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            sync = (i + 1) % self.accum == 0 or i == num - 1
            no_sync = self.ddp.no_sync() if self.ddp is not None and not sync else nullcontext()
            with no_sync:
                with amp:
                    loss, parts, _ = self.forward(x, labels, t_logits, t_feats, t_log_probs)
                (loss / self.accum).backward()
            for k, v in parts.items():
                step_parts[k] = step_parts[k] + v if k in step_parts else v
                sums[k] = sums[k] + v if k in sums else v
            batches += 1
            samples += labels.shape[0]
            window_samples += labels.shape[0]
            if not sync:
                continue
            micro = (i % self.accum) + 1
            if t.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.trainable.parameters(), t.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update(self.student)
            self.global_step += 1
            logging_now = self.global_step % t.log.every_steps == 0
            # Reading the losses waits for the device: only on logged steps.
            values = {k: float(v) / micro for k, v in step_parts.items()} if logging_now else {}
            step_parts = {}
            if logging_now:
                now = time.perf_counter()
                wait = self.loader.stats.total_s - window_wait
                values |= {"lr": self.optimizer.param_groups[0]["lr"],
                           "samples_per_s": window_samples * self.info.world_size / max(now - window_start, 1e-9),
                           "wait_frac": wait / max(now - window_start, 1e-9)}
                window_start, window_samples, window_wait = now, 0, self.loader.stats.total_s
                if self.metrics is not None:
                    self.metrics.write("step", {"global_step": self.global_step, "epoch": epoch, "step": b + 1,
                                                **values})
                self.reporter.step(epoch, b + 1, values)
            if t.checkpoint.every_steps and self.global_step % t.checkpoint.every_steps == 0 and i < num - 1:
                if self.info.is_main:
                    self.ckpt.save_recovery(self.state(epoch, epoch_complete=False))
        elapsed = time.perf_counter() - started
        out: dict[str, Any] = {f"train_{k}": float(v) / max(batches, 1) for k, v in sums.items()}
        out |= {"samples_per_s": samples * self.info.world_size / max(elapsed, 1e-9), "time_s": elapsed,
                "wait_frac": self.loader.stats.epoch_s / max(elapsed, 1e-9), "batches": batches,
                "shards": self.data.train.selected_shards}
        return out

    def live_step(self, step: int) -> bool:
        """With cached targets, whether ``step`` is taught by the live teacher on fresh views (hybrid)."""
        fraction = self.cfg.train.loss.live_fraction
        if fraction <= 0.0:
            return False
        return bool(torch.rand(1, generator=view_generator(self.live_seed, step), dtype=torch.float64) < fraction)

    def evaluate(self) -> dict[str, float]:
        t = self.cfg.train
        model = self.ema.module if self.ema is not None else self.student
        result: dict[str, float] = {}
        if self.info.is_main:
            assert self.data.eval_store is not None
            result = evaluate(model, self.teacher, self.data.eval_store, image_field=IMAGE_FIELD,
                              label_field=LABEL_FIELD, size=self.cfg.model.student.input.size,
                              batch_size=t.eval.batch_size, device=self.device, max_batches=t.eval.max_batches,
                              autocast=self.autocast, teacher_logits_field=t.loss.target_field,
                              cached=self.cached if self.teacher is None and self.data.eval_has_targets else None)
            if "teacher_top1" in result:
                self.teacher_top1 = result["teacher_top1"]
        distributed.barrier(self.info)
        return result

    def end_epoch(self, epoch: int, values: dict[str, Any], last_eval: dict[str, float]) -> None:
        t = self.cfg.train
        metric = {"top1": last_eval.get("top1"), "agreement": last_eval.get("agreement"),
                  "loss": -values.get("train_loss", 0.0)}[t.checkpoint.best_metric]
        is_best = metric is not None and (self.best is None or metric > self.best)
        if is_best:
            self.best = metric
        values = {"global_step": self.global_step, "epoch": epoch, **values}
        if self.info.is_main:
            assert self.metrics is not None
            self.metrics.write("epoch", values)
            self.ckpt.save_epoch(self.state(epoch, epoch_complete=True), epoch, is_best=is_best)
        self.reporter.epoch_end(epoch, values)


def train(cfg: RunConfig, *, resume: str | Path | bool | None = None, reporter: Reporter | None = None,
          device: str | None = None) -> TrainResult:
    """Run ``cfg`` to its last epoch (continuing from a checkpoint with ``resume``: a path, or True for the latest).

    Under torchrun every process calls this; rank 0 alone writes logs and checkpoints.
    """
    info = distributed.setup(device)
    try:
        return _Run(cfg, info, reporter or _Silent()).run(resume)
    finally:
        distributed.teardown(info)
