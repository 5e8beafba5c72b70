"""The small embedded default: a synthetic image folder written as a cache, so every step runs on a laptop."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from shardstore.errors import ShardstoreError
from shardstore.store.atomic import write_bytes_atomic


def synthetic_images(num_classes: int, per_class: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Learnable synthetic images (uint8 NHWC) and labels: each class has its own hue and grating angle."""
    rng = np.random.default_rng([seed, num_classes, per_class, size])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    images = np.empty((num_classes * per_class, size, size, 3), dtype=np.uint8)
    labels = np.repeat(np.arange(num_classes, dtype=np.int64), per_class)
    for i, c in enumerate(labels):
        angle = np.pi * (c + rng.uniform(-0.25, 0.25)) / num_classes
        freq = 3.0 + rng.uniform(-0.5, 0.5)
        phase = rng.uniform(0, 2 * np.pi)
        wave = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)) + phase)
        hue = np.array([np.cos(2 * np.pi * c / num_classes), np.cos(2 * np.pi * (c / num_classes + 1 / 3)),
                        np.cos(2 * np.pi * (c / num_classes + 2 / 3))], dtype=np.float32)
        color = 0.5 + 0.35 * hue + rng.normal(0, 0.05, 3)
        img = wave[..., None] * color[None, None, :] + rng.normal(0, 0.08, (size, size, 3))
        images[i] = np.clip(img * 255, 0, 255).astype(np.uint8)
    return images, labels


def make_image_folder(folder: str | os.PathLike[str], *, num_classes: int = 10, per_class: int = 200,
                      size: int = 40, seed: int = 0) -> int:
    """Write a synthetic class-per-subfolder PNG dataset (what ``shardstore write --from-folder`` reads)."""
    from io import BytesIO

    from PIL import Image

    folder = Path(folder)
    images, labels = synthetic_images(num_classes, per_class, size, seed)
    for i, (img, label) in enumerate(zip(images, labels)):
        target = folder / f"class_{label:02d}" / f"img_{i:05d}.png"
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        buf = BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        write_bytes_atomic(target, buf.getvalue(), fsync=False)
    return len(images)


def digits_arrays(size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 handwritten digits (8x8, shipped inside the package), shuffled, upsampled to
    ``size`` and made uint8 RGB: ``(images [N, 3, size, size], labels [N])``."""
    import torch
    import torch.nn.functional as F

    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ShardstoreError("the demo needs scikit-learn (its bundled digits dataset); "
                              "install it with `pip install scikit-learn` or `pip install -e .[demo]`") from None
    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    images = torch.from_numpy(digits.images[order].astype(np.float32) / 16.0)[:, None]
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    rgb = (images.repeat(1, 3, 1, 1) * 255).round().to(torch.uint8).numpy()
    return rgb, digits.target[order].astype(np.int64)


def write_digits_caches(base: str | os.PathLike[str], *, shard_size: int = 128, test_fraction: float = 0.2,
                        size: int = 32, seed: int = 0) -> tuple[Path, Path]:
    """Write ``base/cache`` (training + validation shards) and ``base/test_cache`` with their manifests."""
    from shardstore.manifest.build import build_manifest
    from shardstore.store.writer import ShardWriter

    base = Path(base)
    images, labels = digits_arrays(size, seed)
    num_test = int(round(len(labels) * test_fraction))
    parts = {"cache": slice(0, len(labels) - num_test), "test_cache": slice(len(labels) - num_test, None)}
    for name, part in parts.items():
        root = base / name
        if not (root / "manifest.json").exists():
            with ShardWriter(root, shard_size, fsync=False) as writer:
                writer.add_batch({"images": images[part], "labels": labels[part]})
            build_manifest(root)
    return base / "cache", base / "test_cache"
