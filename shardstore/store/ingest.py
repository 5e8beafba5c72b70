"""Filling a cache from whole-dataset ``.npy`` files, an image folder (one subfolder per class) or any image source."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol

import numpy as np

from shardstore.errors import ShardstoreError
from shardstore.store.atomic import write_bytes_atomic
from shardstore.store.decode import (  # noqa: F401  (load_image and check_image_size are used from here too)
    DEFAULT_CHUNK_ROWS,
    ImageInput,
    check_image_size,
    decode_in_order,
    default_workers,
    load_image,
)
from shardstore.store.layout import check_field_name
from shardstore.store.npy import open_npy
from shardstore.store.order import (
    read_small_json,
    record_order,
    resume_position,
    source_order,
)
from shardstore.store.writer import ShardWriter

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


# -- image sources ---------------------------------------------------------------------------


class ImageSource(Protocol):
    """What an image ingest reads: ``num_rows`` rows, each an encoded image and an integer label.

    ``inputs(rows)`` returns what a decoding process needs for those rows (paths or encoded bytes, which
    travel to it by pipe), ``describe(row)`` names a row in a message (its file, or the dataset and row).
    """

    classes: list[str] | None
    classes_origin: str
    labels: np.ndarray

    @property
    def num_rows(self) -> int: ...

    def inputs(self, rows: np.ndarray) -> Sequence[ImageInput]: ...

    def describe(self, row: int) -> str: ...


@dataclass(frozen=True)
class ImageFolder:
    """A listed image folder: class names (sorted subfolders), image paths (sorted per class) and labels."""

    classes: list[str]
    paths: list[Path]
    labels: np.ndarray
    classes_origin: ClassVar[str] = "the folder's class subfolders"

    @property
    def num_rows(self) -> int:
        """Images in the folder."""
        return len(self.paths)

    def inputs(self, rows: np.ndarray) -> list[ImageInput]:
        """The rows' file paths (each decoding process opens its files itself)."""
        return [str(self.paths[int(r)]) for r in rows]

    def describe(self, row: int) -> str:
        """The row's file."""
        return str(self.paths[row])


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
        if not files:  # kept, so the labels match a validation folder that has images of it
            log.warning("%s: class %r has no images (%s); its label %d stays unused", folder, name,
                        ", ".join(sorted(IMAGE_SUFFIXES)), label)
        paths.extend(files)
        labels.extend([label] * len(files))
    if not paths:
        raise ShardstoreError(f"{folder} has class subfolders but no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return ImageFolder(classes, paths, np.asarray(labels, dtype=np.int64))


def write_classes(root: Path, classes: list[str], origin: str = ImageFolder.classes_origin) -> None:
    """Record the class names (label ``i`` is ``classes[i]``) in ``ROOT/classes.json``; jobs must agree."""
    path = root / CLASSES_FILE
    if path.exists():
        try:
            existing = read_small_json(path)
        except (OSError, ValueError) as exc:
            raise ShardstoreError(
                f"{path}: not a readable list of class names ({' '.join(str(exc).split())}); delete it and run "
                f"again: it is written again from {origin}"
            ) from None
        if not isinstance(existing, list) or not all(isinstance(name, str) for name in existing):
            raise ShardstoreError(f"{path}: expected a list of class names, got {type(existing).__name__}; delete "
                                  f"it and run again: it is written again from {origin}")
        if existing != classes:
            raise ShardstoreError(
                f"{path} lists other classes than {len(classes)} found now; write to a new cache or delete it"
            )
        return
    write_bytes_atomic(path, (json.dumps(classes, indent=1) + "\n").encode())


def write_images(
    root: str | os.PathLike[str],
    source: ImageSource,
    *,
    image_size: int,
    shard_size: int = 2048,
    start_shard: int = 0,
    num_shards: int | None = None,
    on_error: str = "skip",
    workers: int | None = None,
    shuffle_seed: int | None = 0,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    fsync: bool = True,
    progress: Progress | None = None,
) -> IngestReport:
    """Write an image source as shards of ``images`` (uint8 CHW), ``labels`` (int64) and ``ids`` (source row).

    Rows are written in ``source_order(num_rows, shuffle_seed)`` (a seeded permutation; ``None`` keeps the
    source order), recorded in ``ROOT/order.json``; position ``p`` of that order belongs to the job owning
    shard ``p // shard_size``, so parallel jobs take disjoint ``start_shard``/``num_shards`` ranges. A
    restarted job keeps its complete shards and resumes after the last source row they record, without
    decoding the rows before it. ``workers`` processes decode (default: one per core, at most 4); the
    images reach the writer in order, so the cache is the same byte for byte with any number of them.
    Unreadable images are skipped and counted (``on_error="skip"``) or stop the job with the row named
    (``"stop"``); skipped images make the job's last shard short.
    """
    if on_error not in ("skip", "stop"):
        raise ShardstoreError(f"on_error must be 'skip' or 'stop', got {on_error!r}")
    if workers is not None and workers < 1:
        raise ShardstoreError(f"workers must be at least 1, got {workers}; pass --workers 1 to decode in this process")
    check_image_size(image_size, shard_size)
    root = Path(root)
    order = source_order(source.num_rows, shuffle_seed)
    start, stop = job_range(source.num_rows, shard_size, start_shard, num_shards)
    report = IngestReport(inputs_in_range=stop - start)
    with ShardWriter(root, shard_size, start_shard=start_shard, num_shards=num_shards, fsync=fsync) as writer:
        record_order(root, order, shuffle_seed)
        if source.classes is not None:
            write_classes(root, source.classes, source.classes_origin)
        resume = resume_position(writer, order, start, stop)
        report.samples_already_written = writer.skip_existing()
        if progress is not None and resume > start:
            progress(resume - start)
        decoded = decode_in_order(order[resume:stop], source.inputs, image_size,
                                  workers=default_workers() if workers is None else workers, chunk_rows=chunk_rows)
        with closing(decoded):  # an error below stops the decoding processes at once
            for row, image in decoded:
                if isinstance(image, str):
                    if on_error == "stop":
                        raise ShardstoreError(f"{source.describe(row)}: cannot decode image ({image}); fix or remove "
                                              "it, or pass --on-error skip")
                    log.warning("%s: cannot decode image (%s); skipped", source.describe(row), image)
                    report.bad_inputs.append((source.describe(row), image))
                else:
                    writer.add({"images": image, "labels": source.labels[row], "ids": np.int64(row)})
                if progress is not None:
                    progress(1)
    report.shards_written = writer.shards_written
    report.samples_written = writer.samples_written
    return report


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
    shuffle_seed: int | None = 0,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    fsync: bool = True,
    progress: Progress | None = None,
) -> IngestReport:
    """Write an image folder (a path, or what ``list_image_folder`` returned for it), as ``write_images`` does.

    ``ids`` are indices into the sorted listing (classes in name order, files sorted within each class).
    """
    listing = folder if isinstance(folder, ImageFolder) else list_image_folder(folder)
    return write_images(root, listing, image_size=image_size, shard_size=shard_size, start_shard=start_shard,
                        num_shards=num_shards, on_error=on_error, workers=workers, shuffle_seed=shuffle_seed,
                        chunk_rows=chunk_rows, fsync=fsync, progress=progress)
