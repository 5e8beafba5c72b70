"""Image ingest throughput (images/s) per number of decoding processes, as `shardstore write` decodes them.

    python bench/decode_report.py [--images 2000] [--sizes 64 224] [--workers 1 2 4] [--sources folder hf]
                                  [--repeats 3]

Generates photo-like test images (smooth random texture: JPEG 400x300 at quality 90, PNG 256x256, half of
each, in 4 class folders; and the same bytes as a Hugging Face dataset saved with ``save_to_disk`` when
``datasets`` is installed), then writes each as a cache with ``write_images`` (shuffled, as by default) at each
output size and worker count, timing the whole write: listing, decoding, resizing, cropping and writing shards
(fsync off, so the disk does not set the pace). Prints a Markdown table and the machine it ran on.
One worker decodes in the calling process; more start a spawn pool, whose start-up is inside the timing.
Each row is the best of ``--repeats`` runs (other work on a shared machine only slows a run down), with
the CPU time that run used per image, this process and its decoders together (reaped children's
``getrusage``): a number that other load barely moves, and that shows what the pool costs in start-up
and pickling.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from shardstore.store.ingest import ImageSource, list_image_folder, write_images

CLASSES = 4


def photo_like(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A smooth random texture with some grain: compresses and decodes like a photo, unlike pure noise."""
    coarse = rng.integers(0, 255, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    grain = rng.integers(-12, 12, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.int16) + grain, 0, 255).astype(np.uint8))


def make_folder(folder: Path, count: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(count):
        label = i * CLASSES // count  # class-sorted, like a real folder
        (folder / f"class{label}").mkdir(parents=True, exist_ok=True)
        if i % 2:
            photo_like(rng, 256, 256).save(folder / f"class{label}" / f"{i:05d}.png")
        else:
            photo_like(rng, 400, 300).save(folder / f"class{label}" / f"{i:05d}.jpg", quality=90)


def make_hf(folder: Path, target: Path) -> bool:
    try:
        import datasets
    except ImportError:
        return False
    datasets.disable_progress_bars()
    listing = list_image_folder(folder)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=listing.classes)})
    cells = [{"bytes": p.read_bytes(), "path": None} for p in listing.paths]
    datasets.Dataset.from_dict({"image": cells, "label": listing.labels.tolist()},
                               features=features).save_to_disk(str(target))
    return True


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores visible, Python {platform.python_version()}"


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed_write(root: Path, source: ImageSource, size: int, workers: int) -> tuple[float, float]:
    """Images per second of one whole write, and CPU milliseconds per image (decoders included)."""
    shutil.rmtree(root, ignore_errors=True)
    cpu, start = cpu_seconds(), time.perf_counter()
    report = write_images(root, source, image_size=size, shard_size=512, workers=workers, fsync=False)
    wall = time.perf_counter() - start
    return report.samples_written / wall, (cpu_seconds() - cpu) * 1000 / report.samples_written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 224])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--sources", nargs="+", default=["folder", "hf"], choices=["folder", "hf"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    base = Path(tempfile.mkdtemp(prefix="shardstore-decode-"))
    try:
        make_folder(base / "images", args.images)
        sources = {}
        if "folder" in args.sources:
            sources["folder"] = list_image_folder(base / "images")
        if "hf" in args.sources:
            if make_hf(base / "images", base / "saved"):
                from shardstore.store.hf import hf_image_source

                sources["hf"] = hf_image_source(str(base / "saved"))
            else:
                print("(datasets is not installed: no hf rows)")
        print(f"machine: {machine()}; load average {os.getloadavg()[0]:.1f} at the start")
        print(f"{args.images:,} images: half JPEG 400x300 q90, half PNG 256x256; best of {args.repeats} runs\n")
        print("| source | output px | workers | images/s | vs 1 worker | CPU ms/image |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for name, source in sources.items():
            for size in args.sizes:
                base_rate = None
                for workers in args.workers:
                    rate, cpu_ms = max(timed_write(base / "cache", source, size, workers)
                                       for _ in range(args.repeats))
                    base_rate = base_rate or rate
                    print(f"| {name} | {size} | {workers} | {rate:,.0f} | {rate / base_rate:.2f}x | {cpu_ms:.2f} |",
                          flush=True)
        print(f"\nload average {os.getloadavg()[0]:.1f} at the end")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
