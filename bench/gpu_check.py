"""Stream epochs through ShardLoader to a CUDA device while matrix multiplies keep it busy; print a table.

    python bench/gpu_check.py [--shards 24] [--image-size 128] [--batch 256] [--matmul 4096] [--work 4]

Three timed runs over the same epoch (pages cached first): the GPU work alone, the loader
alone (host-to-device bandwidth), and both together. When the copies overlap the compute,
together takes about max(alone, alone) rather than their sum. Exits 0 with a message on a
machine without CUDA.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from shardstore import ShardStore, ShardWriter, build_manifest
from shardstore.dataset.subset import RandomShardSubsetCachedDataset
from shardstore.loader import ShardLoader


def write_cache(root: Path, shards: int, image_size: int, shard_size: int = 2048) -> None:
    rng = np.random.default_rng(0)
    with ShardWriter(root, shard_size, fsync=False) as writer:
        for _ in range(shards):
            images = rng.integers(0, 256, (shard_size, 3, image_size, image_size), dtype=np.uint8)
            writer.add_batch({"images": images, "labels": rng.integers(0, 1000, shard_size, dtype=np.int64)})
    build_manifest(root)


def epoch(loader: ShardLoader, weights: torch.Tensor | None, work: int) -> tuple[float, int, int]:
    """One epoch: seconds, samples, bytes moved to the device."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    samples = nbytes = 0
    for batch in loader:
        images = batch["images"]
        samples += images.shape[0]
        nbytes += sum(t.numel() * t.element_size() for t in batch.values())
        x = images[:, 0, 0, :8].float().sum()  # the step reads its batch: it must wait for the copy
        if weights is not None:
            y = weights
            for _ in range(work):
                y = y @ weights
            x = x + y[0, 0].float()
    torch.cuda.synchronize()
    return time.perf_counter() - start, samples, nbytes


def compute_only(weights: torch.Tensor, steps: int, work: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        y = weights
        for _ in range(work):
            y = y @ weights
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=24)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--matmul", type=int, default=4096, help="side of the bf16 matrices multiplied per step")
    parser.add_argument("--work", type=int, default=4, help="matrix multiplies per step")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--root", type=Path, default=None, help="reuse or write the cache here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; not run")
        return 0

    root = args.root or Path(tempfile.mkdtemp(prefix="shardstore-gpu-"))
    if not (root / "manifest.json").exists():
        write_cache(root, args.shards, args.image_size)
    store = ShardStore.open(root)
    ds = RandomShardSubsetCachedDataset(store, None, 0, batch_size=args.batch)  # every shard, every epoch
    for path in root.glob("shard_*/*.npy"):  # warm the page cache: this checks the device side
        with open(path, "rb") as f:
            while f.read(8 << 20):
                pass
    weights = torch.randn(args.matmul, args.matmul, device="cuda", dtype=torch.bfloat16) / args.matmul**0.5

    with ShardLoader(ds, device="cuda", num_threads=args.threads) as loader:
        epoch(loader, None, 0)  # warm-up: maps, allocator, CUDA context
        copy_s, samples, nbytes = epoch(loader, None, 0)
        copy_wait = loader.stats.epoch_s
        steps = len(loader)
        busy_s = compute_only(weights, steps, args.work)
        both_s, _, _ = epoch(loader, weights, args.work)
        both_wait = loader.stats.epoch_s
        pinned = loader.pin_memory

    overlap = (copy_s + busy_s - both_s) / min(copy_s, busy_s)
    rows = [
        ("device", torch.cuda.get_device_name()),
        ("cpu cores", str(os.cpu_count())),
        ("torch", torch.__version__),
        ("epoch", f"{samples:,} samples, {nbytes / 1e9:.2f} GB, {steps} batches of {args.batch}"),
        ("pinned host buffers", str(pinned)),
        ("loader alone: host-to-device", f"{nbytes / copy_s / 1e9:.2f} GB/s ({samples / copy_s:,.0f} samples/s)"),
        ("loader alone: consumer waited", f"{copy_wait / copy_s:.1%} of {copy_s:.3f} s"),
        ("GPU work alone", f"{busy_s:.3f} s ({args.work} bf16 {args.matmul}^2 matmuls per step)"),
        ("both together", f"{both_s:.3f} s (sum of the two alone: {copy_s + busy_s:.3f} s)"),
        ("both: consumer waited", f"{both_wait / both_s:.1%} of the epoch"),
        ("copy overlapped compute", f"{'yes' if overlap > 0.8 else 'NO'} ({overlap:.0%} of the shorter run hidden)"),
    ]
    width = max(len(k) for k, _ in rows)
    print("| what | value |\n|---|---|")
    for key, value in rows:
        print(f"| {key:<{width}} | {value} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
