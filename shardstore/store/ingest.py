"""Filling a cache from whole-dataset ``.npy`` files or from an image folder (one subfolder per class)."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shardstore.errors import ShardstoreError
from shardstore.store.atomic import write_bytes_atomic
from shardstore.store.layout import check_field_name, field_file_name, shard_dir_name
from shardstore.store.npy import open_npy
from shardstore.store.writer import ShardWriter, check_shard_memory

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
CLASSES_FILE = "classes.json"

Progress = Callable[[int], None]


@dataclass
class IngestReport:
    """What one ``write`` job did: samples written, samples already on disk, inputs that could not be read."""

    shards_written: list[int] = field(default_factory=list)
    samples_written: int = 0
    samples_already_written: int = 0
    inputs_in_range: int = 0
    bad_inputs: list[tuple[str, str]] = field(default_factory=list)


def job_range(total: int, shard_size: int, start_shard: int, num_shards: int | None) -> tuple[int, int]:
    """Input rows ``[start, stop)`` that the job owning shards ``start_shard .. +num_shards`` writes."""
    start = min(total, start_shard * shard_size)
    stop = total if num_shards is None else min(total, (start_shard + num_shards) * shard_size)
    return start, stop


def _resume_input_position(writer: ShardWriter, start: int, stop: int) -> int:
    """Input row after the last one already on disk, read from the ``ids`` field of the last leading shard.

    The ids are checked (one per row, increasing, inside this job's inputs ``[start, stop)``): a damaged
    file would otherwise move the resume point, past the end in the worst case, and the job would
    write nothing and report success.
    """
    skip = writer.samples_to_skip
    if not skip:
        return start
    k = (skip - 1) // writer.shard_size
    rows = skip - k * writer.shard_size
    shard_dir = writer.root / shard_dir_name(writer.shard_id(k))
    ids_path = shard_dir / field_file_name("ids")
    damaged = (f"a folder ingest resumes after the last input id recorded there; delete {shard_dir} "
               "(it is written again) and run again")
    try:
        ids = np.load(ids_path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise ShardstoreError(
            f"{shard_dir} has no ids.npy: a folder ingest resumes after the last input id its shards record, so it "
            "cannot continue a cache written without ids; write the folder to a new cache directory"
        ) from None
    except (OSError, ValueError) as exc:
        raise ShardstoreError(f"{ids_path}: unreadable ({' '.join(str(exc).split())}); {damaged}") from None
    if ids.shape != (rows,) or ids.dtype.kind not in "iu":
        raise ShardstoreError(f"{ids_path}: damaged (holds {ids.dtype} {list(ids.shape)}, expected {rows} integer "
                              f"ids, one per sample of the shard); {damaged}")
    ids = np.asarray(ids, dtype=np.int64)
    last = int(ids[-1])
    if np.any(np.diff(ids) <= 0) or int(ids[0]) < start or last >= stop or last - start + 1 < skip:
        raise ShardstoreError(f"{ids_path}: damaged (ids {int(ids[0])}..{last} are not {rows} increasing input "
                              f"rows of this job's {start}..{stop - 1}); {damaged}")
    return last + 1


# -- whole-dataset arrays ------------------------------------------------------------------


def open_npy_inputs(specs: dict[str, str | os.PathLike[str]]) -> dict[str, np.ndarray]:
    """Memory-map ``{field: path}`` input arrays (no pickle) and check they have one common length."""
    arrays = {}
    for name, path in specs.items():
        check_field_name(name)
        arrays[name] = open_npy(path)  # an empty or text file is named for what it is, never "unpickle it"
        if arrays[name].ndim == 0:
            raise ShardstoreError(f"{path}: holds a 0-d array; a dataset needs a first (sample) dimension")
    lengths = {name: a.shape[0] for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ShardstoreError(f"input arrays have different lengths {lengths}; every field needs one row per sample")
    return arrays


def write_arrays(
    root: str | os.PathLike[str],
    arrays: dict[str, np.ndarray],
    *,
    shard_size: int = 2048,
    start_shard: int = 0,
    num_shards: int | None = None,
    add_ids: bool = True,
    fsync: bool = True,
    progress: Progress | None = None,
) -> IngestReport:
    """Write rows of whole-dataset arrays into native shards; row ``i`` goes to shard ``i // shard_size``.

    With ``add_ids`` an ``ids`` field records each sample's input row. Parallel jobs pass
    disjoint ``start_shard``/``num_shards``; a restarted job skips its complete shards.
    """
    total = next(iter(arrays.values())).shape[0]
    start, stop = job_range(total, shard_size, start_shard, num_shards)
    report = IngestReport(inputs_in_range=stop - start)
    with ShardWriter(root, shard_size, start_shard=start_shard, num_shards=num_shards, fsync=fsync) as writer:
        skip = report.samples_already_written = writer.skip_existing()
        if progress is not None and skip:
            progress(skip)
        for lo in range(start + skip, stop, shard_size):
            hi = min(stop, lo + shard_size)
            batch = {name: np.asarray(a[lo:hi]) for name, a in arrays.items()}
            if add_ids:
                batch["ids"] = np.arange(lo, hi, dtype=np.int64)
            writer.add_batch(batch)
            if progress is not None:
                progress(hi - lo)
    report.shards_written = writer.shards_written
    report.samples_written = writer.samples_written
    return report


# -- image folders -------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageFolder:
    """A listed image folder: class names (sorted subfolders), image paths (sorted per class) and labels."""

    classes: list[str]
    paths: list[Path]
    labels: np.ndarray


def list_image_folder(folder: str | os.PathLike[str]) -> ImageFolder:
    """List an image folder with one subfolder per class."""
    folder = Path(folder)
    if not folder.is_dir():
        what = "does not exist" if not folder.exists() else "is not a directory"
        raise ShardstoreError(f"{folder} {what}; pass a folder with one subfolder of images per class")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ShardstoreError(f"{folder} has no class subfolders; put each class's images in a subfolder of it")
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        files = sorted(
            p for p in (folder / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
        )
        paths.extend(files)
        labels.extend([label] * len(files))
    if not paths:
        raise ShardstoreError(f"{folder} has class subfolders but no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return ImageFolder(classes, paths, np.asarray(labels, dtype=np.int64))


def load_image(path: Path, size: int) -> np.ndarray:
    """Decode an image, resize its shorter side to ``size``, center-crop to a square: uint8 CHW RGB."""
    from PIL import Image  # Pillow is needed only for image folders

    with Image.open(path) as img:
        img.draft("RGB", (size, size))  # JPEG: decode at a reduced scale that is still >= size
        img = img.convert("RGB")
        w, h = img.size
        scale = size / min(w, h)
        new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((new_w, new_h), Image.Resampling.BILINEAR, reducing_gap=None)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        img = img.crop((left, top, left + size, top + size))
        return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()


def _decoded(paths: Sequence[Path], size: int, workers: int) -> Iterator[np.ndarray | Exception]:
    def one(path: Path) -> np.ndarray | Exception:
        try:
            return load_image(path, size)
        except Exception as exc:  # noqa: BLE001 - Pillow raises many kinds; each is reported with the file name
            return exc

    # Pillow releases the GIL while decoding, so a few threads keep both cores busy.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for lo in range(0, len(paths), 256):
            yield from pool.map(one, paths[lo : lo + 256])


def write_classes(root: Path, classes: list[str]) -> None:
    """Record the class names (label ``i`` is ``classes[i]``) in ``ROOT/classes.json``; jobs must agree."""
    path = root / CLASSES_FILE
    if path.exists():
        try:
            existing = json.loads(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise ShardstoreError(
                f"{path}: not a readable list of class names ({' '.join(str(exc).split())}); delete it and run "
                "again: it is written again from the folder's class subfolders"
            ) from None
        if not isinstance(existing, list) or not all(isinstance(name, str) for name in existing):
            raise ShardstoreError(f"{path}: expected a list of class names, got {type(existing).__name__}; delete "
                                  "it and run again: it is written again from the folder's class subfolders")
        if existing != classes:
            raise ShardstoreError(
                f"{path} lists other classes than {len(classes)} found now; write to a new cache or delete it"
            )
        return
    write_bytes_atomic(path, (json.dumps(classes, indent=1) + "\n").encode())


def check_image_size(image_size: int, shard_size: int) -> None:
    """``ShardstoreError`` for an image size no image can be decoded to, or whose shard cannot be held in memory.

    Checked before any image is read: otherwise every image fails alike and is reported as "cannot decode".
    """
    from PIL import Image  # Pillow is needed only for image folders

    if image_size < 1:
        raise ShardstoreError(f"image size must be at least 1 pixel, got {image_size}")
    limit = Image.MAX_IMAGE_PIXELS
    if limit and image_size * image_size > limit:
        raise ShardstoreError(
            f"image size {image_size:,} makes {image_size * image_size:,}-pixel images, more than Pillow decodes "
            f"({limit:,} pixels); choose an image size of at most {math.isqrt(limit):,} (e.g. 64 or 224)"
        )
    check_shard_memory(shard_size, 3 * image_size * image_size + 16)  # images, labels and ids


def write_image_folder(
    root: str | os.PathLike[str],
    folder: str | os.PathLike[str] | ImageFolder,
    *,
    image_size: int,
    shard_size: int = 2048,
    start_shard: int = 0,
    num_shards: int | None = None,
    on_error: str = "skip",
    workers: int | None = None,
    fsync: bool = True,
    progress: Progress | None = None,
) -> IngestReport:
    """Write an image folder as shards of ``images`` (uint8 CHW), ``labels`` (int64) and ``ids`` (input index).

    ``folder`` is a path or what ``list_image_folder`` returned for it.
    Image ``i`` of the sorted listing belongs to the job owning shard ``i // shard_size``.
    Unreadable images are skipped and counted (``on_error="skip"``) or stop the job with
    the file named (``"stop"``); skipped images make the job's last shard short.
    """
    if on_error not in ("skip", "stop"):
        raise ShardstoreError(f"on_error must be 'skip' or 'stop', got {on_error!r}")
    check_image_size(image_size, shard_size)
    root = Path(root)
    listing = folder if isinstance(folder, ImageFolder) else list_image_folder(folder)
    classes, paths, labels = listing.classes, listing.paths, listing.labels
    start, stop = job_range(len(paths), shard_size, start_shard, num_shards)
    report = IngestReport(inputs_in_range=stop - start)
    workers = workers or min(4, (os.cpu_count() or 1) + 1)
    with ShardWriter(root, shard_size, start_shard=start_shard, num_shards=num_shards, fsync=fsync) as writer:
        write_classes(root, classes)
        resume = _resume_input_position(writer, start, stop)
        report.samples_already_written = writer.skip_existing()
        if progress is not None and resume > start:
            progress(resume - start)
        for i, image in zip(range(resume, stop), _decoded(paths[resume:stop], image_size, workers)):
            if isinstance(image, Exception):
                reason = " ".join(str(image).split()) or type(image).__name__
                if on_error == "stop":
                    raise ShardstoreError(
                        f"{paths[i]}: cannot decode image ({reason}); fix or remove it, or pass --on-error skip"
                    )
                log.warning("%s: cannot decode image (%s); skipped", paths[i], reason)
                report.bad_inputs.append((str(paths[i]), reason))
            else:
                writer.add({"images": image, "labels": labels[i], "ids": np.int64(i)})
            if progress is not None:
                progress(1)
    report.shards_written = writer.shards_written
    report.samples_written = writer.samples_written
    return report
