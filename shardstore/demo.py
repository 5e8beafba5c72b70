"""The small embedded default: a synthetic image folder written as a cache, so every step runs on a laptop."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

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
