"""Cached teacher targets on the demo: size per image, training speed live vs cached, accuracy per K.

    shardstore demo DEMO_DIR                       # first: the caches and the trained teacher
    python bench/teacher_cache_report.py DEMO_DIR [--views 1 4 10] [--seeds 0 1 2] [--device cpu]

For each K it fills the demo cache with K views per image (top-k logits, as `shardstore
cache-teacher` does; name ``k<K>``), measures the bytes the targets take per image on disk
and the fill rate, trains the demo's student from them for each seed (the teacher is not
loaded), and evaluates it on the test split like the demo. One live-teacher run per seed
gives the baseline. Also prints the format's size per image for an ImageNet-sized teacher
(1,000 classes, 2,048-wide embedding), computed from the field layout.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

from shardstore.config.resolve import DEFAULT_DATA_CONFIG, DEFAULT_MODEL_CONFIG, DEFAULT_TRAIN_CONFIG, load_run_config
from shardstore.demo import DEMO_SETTINGS, _fresh, _load_latest_student, demo_overrides, student_overrides
from shardstore.kd.evaluate import evaluate
from shardstore.kd.metrics import read_metrics
from shardstore.kd.target_spec import TargetSpec
from shardstore.kd.teacher import build_teacher
from shardstore.kd.teacher_cache import fill_teacher_cache
from shardstore.kd.trainable import build_student
from shardstore.kd.trainer import train
from shardstore.store.reader import ShardStore

CONFIGS = (DEFAULT_DATA_CONFIG, DEFAULT_TRAIN_CONFIG, DEFAULT_MODEL_CONFIG)


def group_bytes_per_image(root: Path, names: list[str]) -> float:
    store = ShardStore.open(root)
    total = sum(s.files[n].bytes for s in store.shards for n in names if n in s.files)
    return total / store.num_samples


def median_speed(run_dir: Path) -> float:
    epochs = [r for r in read_metrics(run_dir) if r.get("kind") == "epoch"]
    return statistics.median(r["samples_per_s"] for r in epochs[1:] or epochs)


def student_run(base: Path, s: dict, label: str, seed: int, extra: list[str], teacher, test_store, device):
    cache = base / "cache"
    run_dir = base / "runs" / f"report_{label}_seed{seed}"
    cfg = load_run_config(*CONFIGS, demo_overrides(s, cache)
                          + student_overrides(s, run_dir, seed, s["alpha"], base / "teacher.pt") + extra)
    _fresh(run_dir)
    train(cfg, device=device)
    student = build_student(cfg)
    student.load_state_dict(_load_latest_student(run_dir))
    m = evaluate(student, teacher, test_store, image_field="images", label_field="labels",
                 size=cfg.model.student.input.size, batch_size=256, device=torch.device("cpu"))
    return m, median_speed(run_dir)


def fmt(values: list[float], scale: float = 100.0, unit: str = "%") -> str:
    mean = statistics.fmean(values) * scale
    if len(values) < 2:
        return f"{mean:.2f}{unit}"
    return f"{mean:.2f} ± {statistics.stdev(values) * scale:.2f}{unit}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("demo_dir")
    parser.add_argument("--views", type=int, nargs="+", default=[1, 4, 10])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--scale", type=float, nargs=2, default=None, help="crop area range (default: the demo's)")
    parser.add_argument("--flip", action="store_true", help="also flip half of the views")
    args = parser.parse_args()
    base = Path(args.demo_dir).absolute()
    if not (base / "teacher.pt").exists():
        sys.exit(f"{base} has no teacher.pt; run `shardstore demo {base}` first")
    s = dict(DEMO_SETTINGS)
    if args.scale:
        s["scale"] = list(args.scale)
    s["flip"] = s["flip"] or args.flip
    test_store = ShardStore.open(base / "test_cache")
    eval_cfg = load_run_config(*CONFIGS, demo_overrides(s, base / "cache")
                               + [f"model.teacher.checkpoint={base / 'teacher.pt'}"])
    teacher = build_teacher(eval_cfg, torch.device("cpu"))
    rows = []
    live = [student_run(base, s, "live", seed, [], teacher, test_store, args.device) for seed in args.seeds]
    rows.append(("live teacher", "—", "—", live))
    for k in args.views:
        report = fill_teacher_cache(eval_cfg, name=f"k{k}", views=k, topk=s["cached_topk"], device=args.device,
                                    overwrite=True)
        per_image = group_bytes_per_image(base / "cache", list(report.spec.field_names().values()))
        runs = [student_run(base, s, f"k{k}", seed, [f"data.teacher_targets=k{k}"], teacher, test_store,
                            args.device) for seed in args.seeds]
        rows.append((f"cached, K={k}", f"{per_image:,.0f} B ({report.spec.bytes_per_sample():,} B data)",
                     f"{report.images_per_s:,.0f} images/s", runs))
    print(f"\ndemo student {s['student']} width {s['student_width']}, {s['student_epochs']} epochs, "
          f"alpha {s['alpha']}, T {s['temperature']}, crops scale {s['scale']} flip {s['flip']}, "
          f"top-{s['cached_topk']} of 10 classes; seeds {args.seeds}; "
          f"test split; teacher top-1 {100 * live[0][0]['teacher_top1']:.2f}%; {os.cpu_count()} CPUs")
    print(f"{'mode':<14} {'targets/image on disk':<28} {'fill rate':<18} {'top-1':<16} {'agreement':<16} "
          f"{'KL':<12} {'train samples/s (median epoch)'}")
    for label, size, rate, runs in rows:
        metrics = [m for m, _ in runs]
        speeds = [v for _, v in runs]
        print(f"{label:<14} {size:<28} {rate:<18} {fmt([m['top1'] for m in metrics]):<16} "
              f"{fmt([m['agreement'] for m in metrics]):<16} {fmt([m['kl'] for m in metrics], 1.0, ''):<12} "
              f"{statistics.median(speeds):,.0f} ({min(speeds):,.0f}-{max(speeds):,.0f})")
    print("\nformat size per image, ImageNet-sized teacher (computed from the field layout, no headers):")
    for k in (1, 4, 10):
        for label, kw in (("top-10", {"logits": "topk", "topk": 10, "embedding_dim": 0}),
                          ("dense fp16", {"logits": "dense", "topk": 0, "embedding_dim": 0}),
                          ("top-10 + embedding 2048", {"logits": "topk", "topk": 10, "embedding_dim": 2048})):
            spec = TargetSpec(name="t", views=k, num_classes=1000, seed=0, augment={}, image_field="images",
                              image_shape=(3, 224, 224), teacher={}, **kw)
            print(f"  K={k:<3} {label:<24} {spec.bytes_per_sample():>8,} B  "
                  f"({spec.bytes_per_sample() / (3 * 224 * 224):.2%} of a 3x224x224 uint8 image)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
