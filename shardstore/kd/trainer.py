"""The distillation loop: shard epochs in, a student closer to its teacher out; resumable at the exact next batch."""

from __future__ import annotations

import json
import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from shardstore.config.resolve import RunConfig, run_config_to_yaml
from shardstore.config.train import TrainConfig
from shardstore.errors import ConfigError
from shardstore.kd import distributed
from shardstore.kd.augment import AugmentSpec, DeviceAugment, apply_views, view_generator
from shardstore.kd.autocast import amp_enabled
from shardstore.kd.cached_targets import CachedTargets
from shardstore.kd.checkpoint import CheckpointManager
from shardstore.kd.data import build_data
from shardstore.kd.divergence import diverged, finite_weights
from shardstore.kd.ema import ModelEma
from shardstore.kd.evaluate import evaluate
from shardstore.kd.lock import RunDirLock
from shardstore.kd.metrics import EpochTally, MetricsLog
from shardstore.kd.optim import build_optimizer
from shardstore.kd.preempt import PreemptionGuard, RecoveryTrigger, StopPoint, TrainingPreempted
from shardstore.kd.reporter import Reporter, SilentReporter, TrainResult, weights_digest
from shardstore.kd.resume import checkpoint_to_resume, held_out_ids
from shardstore.kd.run_changes import check_resume
from shardstore.kd.run_dir import check_seed, prepare_run_dir
from shardstore.kd.run_state import RunState
from shardstore.kd.schedule import scaled_lr, warmup_cosine
from shardstore.kd.teacher import build_teacher, render_teacher_input, teacher_forward
from shardstore.kd.threads import configure_threads
from shardstore.kd.trainable import Trainable, build_criterion, build_student
from shardstore.loader import ShardLoader
from shardstore.sampling.seeds import LIVE_TEACHING, STUDENT_INIT, TRAIN_VIEWS, derive_seed
from shardstore.store.atomic import write_bytes_atomic
from shardstore.store.reader import load_manifest

log = logging.getLogger(__name__)


def _view_seed(seed: int, rank: int) -> int:
    return derive_seed(seed, rank, stream=TRAIN_VIEWS)


def no_evaluation_note(t: TrainConfig) -> str | None:
    """The line a run that evaluates nothing starts with (it measures no top-1, and may keep no best.pt)."""
    if t.eval.every_epochs == 0:
        why = "train.eval.every_epochs is 0"
    elif t.eval.held_out_shards == 0 and t.eval.cache_root is None:
        why = "train.eval.held_out_shards is 0 and train.eval.cache_root is null"
    else:
        return None
    best = "" if t.checkpoint.best_metric == "loss" else " and keeps no best.pt"
    return (f"no evaluation: {why}, so this run measures no top-1{best}; set train.eval.held_out_shards "
            "(e.g. 1) or train.eval.cache_root to evaluate")


@dataclass
class _Targets:
    """What the teacher says of a batch's views: logits, pooled features, or stored log-probabilities (any None)."""

    logits: torch.Tensor | None = None
    features: torch.Tensor | None = None
    log_probs: torch.Tensor | None = None


@dataclass
class _LogWindow:
    """The steps since the last progress line: when they began, their samples, the loader's waits and downloads."""

    loader: ShardLoader
    began: float
    wait_s: float
    samples: int = 0
    remote_s: float = 0.0
    downloaded: int = 0

    @classmethod
    def start(cls, loader: ShardLoader, now: float) -> _LogWindow:
        window = cls(loader, now, 0.0)
        window.restart(now)
        return window

    def restart(self, now: float) -> None:
        """Begin a new window at ``now``: no samples yet, the loader's wait and download counters as they stand."""
        stats, remote = self.loader.stats, self.loader.store.remote
        self.began, self.samples, self.wait_s, self.remote_s = now, 0, stats.total_s, stats.remote_s
        self.downloaded = remote.cache.stats.bytes_downloaded if remote is not None else 0

    def figures(self, world_size: int) -> dict[str, float]:
        """The window's throughput, share of time waiting for data and, from object storage, its downloads; then
        a new window begins."""
        now = time.perf_counter()
        span = max(now - self.began, 1e-9)
        stats, remote = self.loader.stats, self.loader.store.remote
        values = {"samples_per_s": self.samples * world_size / span, "wait_frac": (stats.total_s - self.wait_s) / span}
        if remote is not None:  # a cache in object storage
            cache = remote.cache.stats
            values |= {"remote_wait_frac": (stats.remote_s - self.remote_s) / span,
                       "download_MBps": (cache.bytes_downloaded - self.downloaded) / span / 1e6,
                       "local_cache_GB": cache.usage_bytes / 1e9, "local_cache_limit_GB": remote.limit / 1e9}
        self.restart(now)
        return values


class _Run(RunState):
    """One training run on this rank, from start-up to its final summary; ``train`` makes one and calls ``run``.

    It holds everything the loop touches: the config and this rank's ``DistInfo``, the run
    directory with its lock and ``CheckpointManager``, the data (``Data``), the frozen teacher,
    the student and criterion inside ``Trainable`` (wrapped by DDP and ``torch.compile`` when
    set), the EMA copy, optimizer and lr schedule, the loaders, and the run's position (epoch,
    ``global_step``, samples seen, best evaluation) that ``RunState`` saves and restores.

    Lifecycle: ``__init__`` checks the seed, the run directory and, on resume, what may change
    before anything is built; it then builds data and models, and only then creates the run
    directory and removes what a killed run left half-written. ``run`` restores the resumed
    state, trains epoch by epoch (``train_epoch``, evaluation, ``end_epoch``'s checkpoint),
    stops at a step boundary with a recovery checkpoint when a preemption signal arrives
    (``TrainingPreempted``), and always closes its loaders and metrics log before it returns.
    """

    def __init__(self, cfg: RunConfig, info: distributed.DistInfo, reporter: Reporter,
                 resume: str | Path | bool | None, guard: PreemptionGuard, lock: RunDirLock) -> None:
        self.cfg, self.info, self.reporter, self.guard, self.lock = cfg, info, reporter, guard, lock
        t = cfg.train
        self.device = info.device
        check_seed(t.seed)
        self.run_dir = Path(t.run_dir)
        prepare_run_dir(self.run_dir, create=False)  # checked now, made once the data and models are known good
        if distributed.broadcast_object(self.run_dir.is_dir(), info):
            lock.acquire_on_main(info)  # before reading its checkpoints: another run may be writing them
        self.ckpt = CheckpointManager(self.run_dir, keep_last=t.checkpoint.keep_last, keep_best=t.checkpoint.keep_best)
        self.resume_path, self.resume_state = checkpoint_to_resume(self.ckpt, resume)
        # Compared before anything is built or loaded: a setting that cannot change is one line, not a page of keys.
        self.changes = None if self.resume_state is None else check_resume(
            self.resume_state, cfg, run_dir=self.run_dir, source=self.resume_path, world_size=info.world_size)
        torch.manual_seed(derive_seed(t.seed, stream=STUDENT_INIT))  # the same initial weights on every rank
        # A resumed run evaluates on the shards it held out when it began, however the cache grew since.
        self.data = build_data(cfg, info, held_out_ids=held_out_ids(self.resume_state))
        self.teacher = build_teacher(cfg, self.device)
        self.teacher_dtype = next(self.teacher.parameters()).dtype if self.teacher is not None else None
        student = build_student(cfg)
        self.criterion = build_criterion(cfg, student, self.teacher, self.data.targets)
        # A run refused above leaves no run directory behind.
        prepare_run_dir(self.run_dir, create=info.is_main)
        lock.acquire_on_main(info)
        if info.is_main:  # what a killed earlier run left half-written (a writer's pid means something here only)
            self.ckpt.remove_stale_temporaries(["config.yaml", "metrics.jsonl",
                                                *(f"final_rank{r}.json" for r in range(info.world_size))])
        self.cached = None
        if self.data.targets is not None:
            # Which stored view each sample trains on: from (seed, rank, epoch, batch), like fresh views.
            self.cached = CachedTargets(self.data.targets, _view_seed(t.seed, info.rank),
                                        temperature=t.loss.temperature, tail=t.loss.sparse_tail)
        # Hybrid teaching: whether a step is taught live is the same on every rank (rank-free seed).
        self.live_seed = derive_seed(t.seed, stream=LIVE_TEACHING)
        self.trainable = Trainable(student, self.criterion).to(self.device)
        if t.channels_last:
            self.trainable = self.trainable.to(memory_format=torch.channels_last)
        self.student = self.trainable.student
        self.ema = ModelEma(self.student, t.ema_decay) if t.ema_decay else None
        self.accum = t.accumulation_steps
        self.global_batch = t.batch_size * info.world_size * self.accum
        self.lr = scaled_lr(t.lr, self.global_batch, t.base_batch_size)
        self.optimizer = build_optimizer(cfg, self.trainable, self.lr)
        updates = self.updates_per_epoch = -(-self.data.train.steps_per_epoch // self.accum)
        # The schedule's length is the run's, not the cache's: a cache that grew does not bend the lr curve.
        total = int((self.resume_state or {}).get("total_steps") or max(1, t.epochs * updates))
        self.total_steps = total
        self.scheduler = warmup_cosine(self.optimizer, total_steps=total, warmup_steps=min(t.warmup_steps, total),
                                       min_lr_ratio=t.min_lr_ratio)
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
        self.loader = self._make_loader(self.data.train)
        # The loader of the epoch being trained: a resumed epoch of a grown cache runs on its own (see _continue_epoch).
        self.active = self.loader
        self.resume_loader: ShardLoader | None = None
        self.tally = EpochTally()
        self.epoch_started = time.perf_counter()
        self.metrics: MetricsLog | None = None
        self.global_step = 0
        self.samples_seen = 0  # over all ranks, for the messages of a stop or a resume
        self.resume_point: StopPoint | None = None
        self.recovery = RecoveryTrigger(guard, info, every_steps=t.checkpoint.every_steps,
                                        every_minutes=t.checkpoint.every_minutes)
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.teacher_top1: float | None = None

    def _note(self, line: str) -> None:
        log.info("%s", line)
        note = getattr(self.reporter, "note", None)
        if note is not None and self.info.is_main:
            note(line)

    def _manifest_generation(self) -> int | None:
        """With ``refresh_manifest`` on several ranks: the manifest generation rank 0 sees, so every rank plans the
        epoch on the same snapshot (None: one rank, or no refresh, each reads what it sees)."""
        if not self.cfg.data.refresh_manifest or self.info.world_size == 1:
            return None
        generation = None
        if self.info.is_main:
            generation = load_manifest(self.loader.dataset.store.root).generation
        return int(distributed.broadcast_object(generation, self.info))  # type: ignore[arg-type]

    def _make_loader(self, dataset: Any, *, prepare_next_epoch: bool = True) -> ShardLoader:
        return ShardLoader(dataset, device=self.device if self.device.type == "cuda" else None,
                           prepare_next_epoch=prepare_next_epoch, **self.cfg.data.loader_kwargs())

    def check_finite(self, epoch: int, step: int, *, weights: bool = False) -> None:
        """Stop with ``NonFiniteLossError`` once a loss (or, with ``weights``, a weight) is NaN or infinite.

        Called where the loop reads the device anyway (logged steps, the end of an epoch) and
        before every checkpoint, so no NaN weights are ever saved over the last good ones.
        Every rank calls it at the same points and they agree, so none waits on another.
        """
        self.data.image_format.check_seen_labels()  # on a GPU: a label outside the classes (see kd/images.py)
        ok = self.tally.finite() and (not weights or finite_weights(self.trainable))
        if self.info.distributed:
            ok = distributed.all_reduce_mean(0.0 if ok else 1.0, self.info) == 0.0
        if ok:
            return
        try:
            last = self.ckpt.latest()
        except ConfigError:
            last = None
        raise diverged(self.cfg, epoch=epoch, step=step, global_step=self.global_step, last_good=last,
                       autocast=self.autocast, float_images=self.data.image_format.dtype not in ("uint8", "uint16"))

    # -- the loop -------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        t = self.cfg.train
        last_eval: dict[str, float] = {}
        try:
            start_epoch, mid_epoch = 0, False
            if self.resume_state is not None:
                start_epoch = self.restore(self.resume_state)
                mid_epoch = not self.resume_state["epoch_complete"]
                self.resume_state = None
            if self.info.is_main:
                write_bytes_atomic(self.run_dir / "config.yaml", run_config_to_yaml(self.cfg).encode())
                MetricsLog.truncate(self.run_dir, self.global_step)
                self.metrics = MetricsLog(self.run_dir, tensorboard=t.log.tensorboard)
            self.recovery.saved(self.global_step)  # the clock of checkpoint.every_minutes starts now
            if self.recovery.stop_requested():  # asked during start-up: nothing new to save
                raise self._preempted(self.resume_point or self.stop_point(0, False), self.resume_path, saved=False)
            note = no_evaluation_note(t)
            if note is not None:
                self._note(note)
            for epoch in range(start_epoch, t.epochs):
                if not mid_epoch:
                    self.active = self.loader
                    self.loader.set_epoch(epoch, generation=self._manifest_generation())
                    self.tally = EpochTally()
                mid_epoch = False
                self.reporter.epoch_start(epoch, t.epochs, self.active.dataset.selected_shards, len(self.active))
                values = self.train_epoch(epoch)
                # One set of running statistics for evaluation, checkpoints and every rank's next epoch.
                distributed.broadcast_buffers(self.student, self.info)
                if self.ema is not None:
                    distributed.broadcast_buffers(self.ema.module, self.info)
                if self.data.eval_store is not None and t.eval.every_epochs and (epoch + 1) % t.eval.every_epochs == 0:
                    last_eval = self.evaluate()
                    values |= {f"eval_{k}": v for k, v in last_eval.items()}
                self.end_epoch(epoch, values, last_eval)
                self.recovery.saved(self.global_step)
                if self.resume_loader is not None:  # the resumed epoch is done: new shards join from here on
                    self.resume_loader.close()
                    self.resume_loader = None
                if epoch + 1 < t.epochs and self.recovery.stop_requested():  # continue from this epoch's checkpoint
                    raise self._preempted(self.stop_point(epoch, True), self.ckpt.dir / f"epoch_{epoch:04d}.pt")
        finally:
            self.loader.close()
            if self.resume_loader is not None:
                self.resume_loader.close()
            if self.metrics is not None:
                self.metrics.close()
        digest = weights_digest(self.student)
        summary = {"rank": self.info.rank, "global_step": self.global_step, "weights_sha256": digest}
        write_bytes_atomic(self.run_dir / f"final_rank{self.info.rank}.json", json.dumps(summary).encode())
        distributed.barrier(self.info)
        return TrainResult(self.run_dir, self.global_step, t.epochs, last_eval, digest)

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """Train one epoch (the rest of it when resuming) and return its means and figures."""
        self.trainable.train()
        loader, tally = self.active, self.tally  # the tally holds the batches before a resume too
        first = loader.dataset.start_batch
        num = len(loader)
        started = self.epoch_started = time.perf_counter()
        window = _LogWindow.start(loader, started)
        step_parts: dict[str, torch.Tensor] = {}
        amp = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.autocast else nullcontext()
        b = first - 1
        for i, batch in enumerate(loader):
            b = first + i
            fmt = self.data.image_format  # the user's fields, layout and dtype -> [B, C, H, W] (see kd/images.py)
            images = fmt.images(batch[fmt.image_field].to(self.device, non_blocking=True))
            labels = fmt.labels(batch[fmt.label_field].to(self.device, non_blocking=True))
            # Views (fresh or stored) depend on (seed, rank, epoch, batch) only: a resumed run uses the same ones.
            x, targets = self.student_input_and_targets(batch, images, epoch * (1 << 32) + b, amp)
            sync = (i + 1) % self.accum == 0 or i == num - 1
            parts = self.backward(x, labels, targets, sync, amp)
            for k, v in parts.items():
                step_parts[k] = step_parts[k] + v if k in step_parts else v
            tally.add(parts, labels.shape[0])
            window.samples += labels.shape[0]
            self.samples_seen += labels.shape[0] * self.info.world_size
            if not sync:
                continue
            self.optimizer_step()
            logging_now = self.global_step % self.cfg.train.log.every_steps == 0
            if logging_now:  # reading the losses waits for the device: only on logged steps
                micro = (i % self.accum) + 1
                self.log_step(epoch, b + 1, {k: float(v) / micro for k, v in step_parts.items()}, window)
            step_parts = {}
            # Under torchrun the ranks agree on logged steps, where they wait for the device anyway.
            stop, due = self.recovery.at_step(self.global_step, can_agree=logging_now)
            if stop or (due and i < num - 1):  # the epoch's own checkpoint follows its last batch
                self.save_recovery(epoch, b + 1)
            if stop:
                raise self._preempted(self.stop_point(epoch, False), self.ckpt.dir / "recovery.pt")
        elapsed = time.perf_counter() - started
        self.check_finite(epoch, b + 1, weights=True)
        seconds = tally.seconds + elapsed  # the whole epoch's, across a resume
        out: dict[str, Any] = tally.means()
        out |= {"samples_per_s": tally.samples * self.info.world_size / max(seconds, 1e-9), "time_s": seconds,
                "wait_frac": loader.stats.epoch_s / max(elapsed, 1e-9), "batches": tally.batches,
                "shards": loader.dataset.selected_shards}
        return out

    def student_input_and_targets(self, batch: dict[str, torch.Tensor], images: torch.Tensor, step: int,
                                  amp: Any) -> tuple[torch.Tensor, _Targets]:
        """The student's augmented input for ``step`` and the teacher's targets on the same view.

        From the cache (a stored view and its stored targets) unless the step is taught live: then fresh views, and
        the targets from ``loss.target_field`` or the live teacher (None when the loss needs none).
        """
        loss_cfg = self.cfg.train.loss
        targets = _Targets()
        if self.cached is not None and not self.live_step(step):
            picked = self.cached.pick({k: v.to(self.device, non_blocking=True) for k, v in batch.items()
                                       if k in self.cached.names.values()}, step)
            x = apply_views(images, picked.views, self.augment.spec.size)
            targets = _Targets(picked.logits, picked.features, picked.log_probs)
        else:
            x, views = self.augment(images, step=step)
            if loss_cfg.target_field:
                targets.logits = batch[loss_cfg.target_field].to(self.device).float()
            elif loss_cfg.alpha > 0 or loss_cfg.feature_loss != "none":
                assert self.teacher is not None
                tx = x if self.teacher.size == x.shape[-1] else render_teacher_input(images, views, self.teacher)
                with torch.no_grad(), amp:
                    targets.logits, targets.features = teacher_forward(
                        self.teacher, tx.to(self.teacher_dtype), features=loss_cfg.feature_loss != "none")
        if self.cfg.train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, targets

    def backward(self, x: torch.Tensor, labels: torch.Tensor, targets: _Targets, sync: bool,
                 amp: Any) -> dict[str, torch.Tensor]:
        """Forward and backward of one micro-batch (gradients reduced over ranks only when ``sync``); its loss parts."""
        no_sync = self.ddp.no_sync() if self.ddp is not None and not sync else nullcontext()
        with no_sync:
            with amp:
                loss, parts, _ = self.forward(x, labels, targets.logits, targets.features, targets.log_probs)
            (loss / self.accum).backward()
        return parts

    def optimizer_step(self) -> None:
        """Clip, step, clear the gradients, advance the schedule and the EMA: one optimizer step taken."""
        if self.cfg.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.trainable.parameters(), self.cfg.train.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.student)
        self.global_step += 1

    def log_step(self, epoch: int, step: int, values: dict[str, float], window: _LogWindow) -> None:
        """Check finiteness, add the window's throughput, waits and downloads to ``values``, write and report them."""
        self.check_finite(epoch, step)  # the device was just read: checking every batch so far is cheap
        values = values | {"lr": self.optimizer.param_groups[0]["lr"]} | window.figures(self.info.world_size)
        if self.metrics is not None:
            self.metrics.write("step", {"global_step": self.global_step, "epoch": epoch, "step": step, **values})
        self.reporter.step(epoch, step, values)

    def save_recovery(self, epoch: int, step: int) -> None:
        """A recovery checkpoint of the current step (every rank calls it: the finiteness check is collective)."""
        if not self.recovery.is_new(self.global_step):
            return  # the newest checkpoint is of this very step
        self.check_finite(epoch, step, weights=True)  # never save NaN weights over the last good ones
        if self.info.is_main:
            self.ckpt.save_recovery(self.state(epoch, epoch_complete=False))
        self.recovery.saved(self.global_step)

    def _preempted(self, point: StopPoint, checkpoint: Path | None, *, saved: bool = True) -> TrainingPreempted:
        return TrainingPreempted(self.recovery.signal_name, point, checkpoint, saved=saved and checkpoint is not None)

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
            result = evaluate(model, self.teacher, self.data.eval_store, image_format=self.data.image_format,
                              size=self.cfg.model.student.input.size,
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
            self.best, self.best_epoch = metric, epoch
        values = {"global_step": self.global_step, "epoch": epoch, **values}
        if self.info.is_main:
            assert self.metrics is not None
            self.metrics.write("epoch", values)
            self.ckpt.save_epoch(self.state(epoch, epoch_complete=True), epoch, is_best=is_best)
        self.reporter.epoch_end(epoch, values)


def train(cfg: RunConfig, *, resume: str | Path | bool | None = None, reporter: Reporter | None = None,
          device: str | None = None) -> TrainResult:
    """Run ``cfg`` to its last epoch, continuing from a checkpoint with ``resume``: a path, True for the run
    directory's latest (an error if it has none) or ``"auto"`` (the latest if any, else from scratch).

    Under torchrun every process calls this; rank 0 alone writes logs and checkpoints and holds ``RUN_DIR/.lock``.
    A signal of ``train.preempt_signals`` ends the run after the current step with a recovery checkpoint and
    ``TrainingPreempted`` (see ``shardstore.kd.preempt``).
    """
    info = distributed.setup(device)
    configure_threads(cfg.train.threads, cfg.data.loader_threads)  # torch's threads beside the loader's, not on them
    lock = RunDirLock(cfg.train.run_dir)
    try:
        # The signals only set a flag from here on: the loop stops at the next step with a recovery checkpoint.
        with PreemptionGuard(cfg.train.preempt_signals, notify=info.is_main) as guard:
            try:
                return _Run(cfg, info, reporter or SilentReporter(), resume, guard, lock).run()
            except Exception:
                if guard.aborted:  # raised inside torch.save, the interrupt comes out as its RuntimeError
                    raise KeyboardInterrupt from None
                raise
    finally:
        lock.release()
        distributed.teardown(info)
