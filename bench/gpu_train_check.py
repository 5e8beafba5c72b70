"""The distillation trainer on a CUDA machine: ResNet-50 teacher -> ResNet-18 student at 224 px, bf16, batch 256.

    python bench/gpu_train_check.py [--shards 8] [--epochs 2] [--steps 60] [--root DIR]
    python bench/gpu_train_check.py --tiny   # the same path on a CPU, tiny sizes (a smoke test)

Writes a synthetic cache (random uint8 3x224x224 images, 2048 per shard) on the machine's
disk, trains from it through ``shardstore.kd.trainer.train`` and prints a table: images/s,
the share of step time the trainer waited for data (target < 2%), and the share of step
time spent in the teacher's forward (timed separately with CUDA events on the same batches).
Then (``--cached-views K``, default 2) it caches the teacher's top-10 for K views per image,
checks 256 stored targets against the live teacher in the same precision, and trains the
same student from the cached targets: images/s with and without the teacher's forward.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from shardstore import ShardWriter, build_manifest
from shardstore.config.resolve import DEFAULT_DATA_CONFIG, DEFAULT_MODEL_CONFIG, DEFAULT_TRAIN_CONFIG, load_run_config
from shardstore.kd.metrics import read_metrics
from shardstore.kd.trainer import train


def write_cache(root: Path, shards: int, size: int, shard_size: int) -> None:
    rng = np.random.default_rng(0)
    with ShardWriter(root, shard_size, fsync=False) as writer:
        for _ in range(shards):
            writer.add_batch({"images": rng.integers(0, 256, (shard_size, 3, size, size), dtype=np.uint8),
                              "labels": rng.integers(0, 1000, shard_size, dtype=np.int64)})
    build_manifest(root)


def teacher_share(cfg, device: torch.device, batch: int, size: int, steps: int = 10) -> float:
    """Teacher forward time / (teacher forward + student forward and backward), on random batches."""
    from shardstore.kd.teacher import build_teacher
    from shardstore.kd.trainable import build_student

    teacher = build_teacher(cfg, device)
    student = build_student(cfg).to(device)
    x = torch.rand(batch, 3, size, size, device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def timed(fn) -> float:
        for _ in range(2):
            fn()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
        t = time.perf_counter()
        for _ in range(steps):
            fn()
        return time.perf_counter() - t

    def teacher_step() -> None:
        with torch.no_grad(), amp:
            teacher(x.to(next(teacher.parameters()).dtype))

    def student_step() -> None:
        with amp:
            loss = student(x).float().logsumexp(1).mean()
        loss.backward()

    t_teacher, t_student = timed(teacher_step), timed(student_step)
    return t_teacher / (t_teacher + t_student)


def cached_pass(sets: list[str], root: Path, views: int, batch: int) -> list[tuple[str, str]]:
    """cache-teacher (K views, top-10) on the same cache, the check in this precision, and training from it."""
    from shardstore.kd.teacher_cache import fill_teacher_cache
    from shardstore.kd.teacher_check import check_teacher_cache

    cfg = load_run_config(DEFAULT_DATA_CONFIG, DEFAULT_TRAIN_CONFIG, DEFAULT_MODEL_CONFIG, sets)
    fill = fill_teacher_cache(cfg, name="gpu_check", views=views, topk=10, batch_size=4 * batch, fsync=False,
                              overwrite=True)
    check = check_teacher_cache(cfg, name="gpu_check", samples=256)
    cached_cfg = load_run_config(DEFAULT_DATA_CONFIG, DEFAULT_TRAIN_CONFIG, DEFAULT_MODEL_CONFIG,
                                 sets + [f"train.run_dir={root / 'run_cached'}", "data.teacher_targets=gpu_check"])
    train(cached_cfg)
    last = [r for r in read_metrics(root / "run_cached") if r["kind"] == "epoch"][-1]
    return [
        ("cache-teacher", f"{fill.images_per_s:,.0f} images/s x {views} views "
                          f"({fill.spec.bytes_per_sample():,} B/image)"),
        ("check, 256 stored views", f"top-1 match {100 * (check.top1_match or 0):.1f}%, worst KL {check.worst_kl:.2g} "
                                    f"nats, passed {check.passed}"),
        ("images/s from cached targets (last epoch)", f"{last['samples_per_s']:,.0f} (data wait "
                                                      f"{100 * last['wait_frac']:.2f}%)"),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60, help="max_steps_per_epoch")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--root", type=Path, default=None)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: 32 px, small models, few steps")
    parser.add_argument("--cached-views", type=int, default=2,
                        help="also cache the teacher for K views per image and train from it (0 = skip)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        print("gpu_train_check: no CUDA device here; not run (use --tiny for a CPU smoke test)")
        return 0
    size, shard_size = (32, 256) if args.tiny else (224, 2048)
    teacher, student = ("resnet20", "resnet8") if args.tiny else ("resnet50", "resnet18")
    batch, steps, shards = (32, 4, 3) if args.tiny else (args.batch, args.steps, args.shards)
    root = args.root or Path(tempfile.mkdtemp(prefix="shardstore-train-check-"))
    cache = root / "cache"
    if not (cache / "manifest.json").exists():
        write_cache(cache, shards, size, shard_size)
    sets = [f"data.cache_root={cache}", "data.shards_per_epoch=null", f"train.run_dir={root / 'run'}",
            f"train.epochs={args.epochs}", f"train.batch_size={batch}", f"train.max_steps_per_epoch={steps}",
            f"train.base_batch_size={batch}", "train.eval.held_out_shards=0", "train.eval.every_epochs=0",
            "train.augment.flip=true", "train.augment.scale=[0.35, 1.0]", "train.log.every_steps=10",
            "train.log.tensorboard=false", "train.amp=auto", "model.num_classes=1000",
            f"model.teacher.name={teacher}", "model.teacher.checkpoint=null", "model.teacher.dtype=bfloat16",
            f"model.student.name={student}", "model.teacher.kwargs={}", "model.student.kwargs={}",
            *[f"model.{n}.input.{k}={v}" for n in ("teacher", "student") for k, v in
              (("size", size), ("mean", [0.485, 0.456, 0.406]), ("std", [0.229, 0.224, 0.225]))]]
    cfg = load_run_config(DEFAULT_DATA_CONFIG, DEFAULT_TRAIN_CONFIG, DEFAULT_MODEL_CONFIG, sets)
    for old in ("run", "run_cached"):
        shutil.rmtree(root / old, ignore_errors=True)  # this script's own runs of an earlier call
    started = time.perf_counter()
    train(cfg)
    wall = time.perf_counter() - started
    epochs = [r for r in read_metrics(root / "run") if r["kind"] == "epoch"]
    last = epochs[-1]  # the first epoch pays for cuDNN autotuning and warm-up
    cached_rows = cached_pass(sets, root, args.cached_views, batch) if args.cached_views else []
    share = teacher_share(cfg, torch.device("cuda" if cuda else "cpu"), batch, size)
    rows = [
        ("device", torch.cuda.get_device_name() if cuda else "cpu (--tiny)"),
        ("cpu cores / torch", f"{os.cpu_count()} / {torch.__version__}"),
        ("models", f"{teacher} (bf16, frozen) -> {student}, {size}px, batch {batch}, amp bf16" if cuda else
         f"{teacher} -> {student}, {size}px, batch {batch}"),
        ("images/s (last epoch)", f"{last['samples_per_s']:,.0f}"),
        ("data wait, share of step time", f"{100 * last['wait_frac']:.2f}%  (target < 2%)"),
        ("teacher forward, share of step time", f"{100 * share:.1f}%"),
        ("epochs / wall", f"{len(epochs)} x {last['batches']} steps / {wall:.1f} s"),
        *cached_rows,
    ]
    print("| what | value |\n|---|---|")
    for key, value in rows:
        print(f"| {key} | {value} |")
    print(json.dumps({k: v for k, v in last.items() if k != "shards"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
