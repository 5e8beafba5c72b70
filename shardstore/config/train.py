"""``train_config_kd.yaml`` as a typed object: the optimizer, schedule and precision, with one section per component."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from typing import Literal

from shardstore.config.schema import at_least, between, from_mapping, load_yaml, positive


@dataclass(frozen=True, kw_only=True)
class LossConfig:
    """How the distillation loss mixes the teacher's soft targets, the labels and (optionally) features."""

    alpha: float = 0.5
    """Weight of the KD term; the label term gets ``1 - alpha``."""
    temperature: float = 4.0
    """Softmax temperature of the KD term."""
    feature_loss: Literal["none", "cosine", "smooth_l1", "mse"] = "none"
    """Loss between projected student features and teacher features; ``none`` turns it off."""
    feature_weight: float = 0.0
    """Weight of the feature term."""
    projector_hidden: int = 0
    """Hidden width of the student-to-teacher feature projector; 0 = a linear projection."""
    target_field: str | None = None
    """Read teacher logits (one per sample, no views) from this cache field instead of running the teacher."""
    sparse_tail: Literal["spread", "renormalise"] = "spread"
    """Cached top-k targets: the other classes share the stored tail mass (spread) or are dropped (renormalise)."""
    live_fraction: float = 0.0
    """With cached targets: this fraction of steps uses fresh views and the live teacher instead (hybrid)."""

    def __post_init__(self) -> None:
        between("alpha", self.alpha, 0.0, 1.0, " (the weight of the KD term)")
        positive("temperature", self.temperature, "4.0")
        at_least("feature_weight", self.feature_weight, 0)
        at_least("projector_hidden", self.projector_hidden, 0)
        between("live_fraction", self.live_fraction, 0.0, 1.0, " (the share of steps taught live)")
        if self.feature_loss == "none" and self.feature_weight > 0:
            raise ValueError(f"`feature_weight` is {self.feature_weight} but `feature_loss` is none; "
                             "set feature_loss to cosine, smooth_l1 or mse, or feature_weight to 0")
        if self.feature_loss != "none" and self.feature_weight == 0:
            raise ValueError(f"`feature_loss` is {self.feature_loss} but `feature_weight` is 0; "
                             "set feature_weight above 0 (e.g. 1.0) or feature_loss to none")
        if self.target_field is not None and not self.target_field.strip():
            raise ValueError("`target_field` is empty; name a cache field (e.g. teacher_logits) or set it to null")


@dataclass(frozen=True, kw_only=True)
class AugmentConfig:
    """Augmentation of training batches (on the device, after the copy)."""

    random_resized_crop: bool = True
    """Crop a random area and aspect ratio, resized back to the input size."""
    scale: tuple[float, float] = (0.35, 1.0)
    """Range of the cropped area as a fraction of the image."""
    ratio: tuple[float, float] = (0.75, 1.3333333)
    """Range of the crop's aspect ratio (width / height)."""
    flip: bool = True
    """Flip half of the images horizontally."""

    def __post_init__(self) -> None:
        low, high = self.scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"`scale` must be [low, high] with 0 < low <= high <= 1, got {list(self.scale)}; "
                             "e.g. [0.35, 1.0]")
        low, high = self.ratio
        if not 0 < low <= high:
            raise ValueError(f"`ratio` must be [low, high] with 0 < low <= high, got {list(self.ratio)}; "
                             "e.g. [0.75, 1.3333333]")


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """When and on what the student is evaluated."""

    every_epochs: int = 1
    """Evaluate after every N epochs; 0 = never."""
    held_out_shards: int = 0
    """The last N shards of the cache (by id) are held out of training and used for evaluation."""
    cache_root: str | None = None
    """A separate evaluation cache instead (relative to the train config's folder)."""
    max_batches: int | None = None
    """Stop each evaluation after this many batches; null = the whole evaluation set."""
    batch_size: int = 256
    """Evaluation batch size (per rank)."""

    def __post_init__(self) -> None:
        at_least("every_epochs", self.every_epochs, 0)
        at_least("held_out_shards", self.held_out_shards, 0)
        at_least("max_batches", self.max_batches, 1)
        at_least("batch_size", self.batch_size, 1)
        if self.held_out_shards > 0 and self.cache_root is not None:
            raise ValueError(f"`held_out_shards` is {self.held_out_shards} and `cache_root` is set; evaluate on one: "
                             "set held_out_shards to 0 or cache_root to null")
        if self.cache_root is not None and not self.cache_root.strip():
            raise ValueError("`cache_root` is empty; name the evaluation cache's directory or set it to null")


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """Which checkpoints are written to the run directory and kept."""

    keep_last: int = 3
    """End-of-epoch checkpoints kept (older ones are deleted)."""
    keep_best: bool = True
    """Also keep the checkpoint with the best ``best_metric``."""
    every_steps: int = 0
    """A recovery checkpoint every N optimizer steps inside an epoch; 0 = off."""
    every_minutes: float = 10.0
    """A recovery checkpoint inside an epoch once this many minutes passed since the last checkpoint; 0 = off."""
    best_metric: Literal["top1", "agreement", "loss"] = "top1"
    """Evaluation metric that picks the best checkpoint (top1 and agreement higher, loss lower is better)."""

    def __post_init__(self) -> None:
        at_least("keep_last", self.keep_last, 1)
        at_least("every_steps", self.every_steps, 0)
        at_least("every_minutes", self.every_minutes, 0)


@dataclass(frozen=True, kw_only=True)
class LogConfig:
    """What is logged, and how often."""

    every_steps: int = 10
    """Log training metrics every N optimizer steps."""
    tensorboard: bool = True
    """Write TensorBoard event files to the run directory (when tensorboard is installed)."""
    progress_every_s: float = 30.0
    """When output is not a terminal (a SLURM log), print a plain progress line this often inside an epoch; 0 = off."""

    def __post_init__(self) -> None:
        at_least("every_steps", self.every_steps, 1)
        at_least("progress_every_s", self.progress_every_s, 0)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The distillation run: where it writes, how long it trains, the optimizer, schedule and precision."""

    run_dir: str = "runs/kd"
    """Directory for checkpoints, logs and the resolved config (relative to the current directory)."""
    seed: int = 0
    """Seed of model initialisation and augmentation (the data order has its own seed)."""
    epochs: int = 10
    """Number of epochs."""
    batch_size: int = 64
    """Training batch size per rank."""
    max_steps_per_epoch: int | None = 500
    """Cap on batches per epoch; null = every batch of the epoch's shards."""
    optimizer: Literal["adamw", "sgd"] = "adamw"
    """``adamw`` or ``sgd``."""
    lr: float = 1e-3
    """Peak learning rate at ``base_batch_size``."""
    base_batch_size: int = 256
    """The lr is scaled linearly by the global batch (samples per optimizer step over all ranks) / this."""
    weight_decay: float = 0.05
    """Weight decay."""
    momentum: float = 0.9
    """Momentum of sgd."""
    warmup_steps: int = 100
    """Optimizer steps of linear warmup to the peak lr."""
    min_lr_ratio: float = 0.0
    """Learning rate at the end of the schedule, as a fraction of the peak."""
    grad_clip: float | None = 1.0
    """Clip the global gradient norm to this; null = no clipping."""
    accumulation_steps: int = 1
    """Batches whose gradients are summed before each optimizer step."""
    amp: Literal["auto", "bf16", "off"] = "auto"
    """Mixed precision: auto = bf16 on CUDA, off on CPU."""
    compile: bool = False
    """Compile the student with ``torch.compile``."""
    channels_last: bool = False
    """Use the channels-last memory format for images and models."""
    ema_decay: float | None = None
    """Keep an exponential moving average of the student's weights with this decay; null = off."""
    threads: int | None = None
    """torch's CPU threads per process; null or 0 = what the machine leaves after the loader's threads."""
    loss: LossConfig = field(default_factory=LossConfig)
    """The distillation loss."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """Augmentation of training batches."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoints."""
    log: LogConfig = field(default_factory=LogConfig)
    """Logging."""
    preempt_signals: tuple[str, ...] = ("SIGTERM", "SIGINT", "SIGUSR1")
    """Signals that stop the run after the current step with a recovery checkpoint (exit code 75); [] = none."""

    def __post_init__(self) -> None:
        if not self.run_dir.strip():
            raise ValueError("`run_dir` is empty; name the directory the run writes to, e.g. runs/kd")
        at_least("seed", self.seed, 0)
        at_least("threads", self.threads, 0)
        for key in ("epochs", "batch_size", "max_steps_per_epoch", "base_batch_size", "accumulation_steps"):
            at_least(key, getattr(self, key), 1)
        positive("lr", self.lr, "0.001")
        at_least("weight_decay", self.weight_decay, 0)
        if not 0 <= self.momentum < 1:
            raise ValueError(f"`momentum` must be at least 0 and below 1, got {self.momentum}; e.g. 0.9")
        at_least("warmup_steps", self.warmup_steps, 0)
        between("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0, " (a fraction of the peak lr)")
        positive("grad_clip", self.grad_clip, "1.0 (or null for no clipping)")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"`ema_decay` must be above 0 and below 1, got {self.ema_decay}; e.g. 0.999, "
                             "or null for no EMA")
        for name in self.preempt_signals:
            catchable_signal(name)


def catchable_signal(name: str) -> signal.Signals:
    """The signal ``name`` (``SIGUSR1``, ``USR1`` or ``usr1``) names if a handler can catch it, else ``ValueError``."""
    wanted = name.strip().upper()
    wanted = wanted if wanted.startswith("SIG") else f"SIG{wanted}"
    found = signal.Signals.__members__.get(wanted)
    if found is None or found in (signal.SIGKILL, signal.SIGSTOP):
        raise ValueError(f"`preempt_signals` holds {name!r}, not a signal a process can catch; use names such as "
                         "SIGTERM, SIGINT, SIGUSR1 (SLURM's --signal=USR1@120), or [] for none")
    return found


def train_config_from_dict(values: dict, source: str = "train_config_kd.yaml") -> TrainConfig:
    """Check a train config mapping; ``ConfigError`` naming ``source``, the key and the fix."""
    return from_mapping(TrainConfig, values, source)


def load_train_config(path: str | os.PathLike[str]) -> TrainConfig:
    """Read ``train_config_kd.yaml`` as is (``load_run_config`` also resolves ``eval.cache_root``)."""
    return train_config_from_dict(load_yaml(path, option="--train-config"), str(path))
