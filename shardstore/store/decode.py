"""Decoding images for a cache: one resize-and-crop rule, run in order in this process or in a pool of processes.

Decoding is what limits an image ingest (a 224 px JPEG costs milliseconds; writing its bytes, microseconds),
so it runs in worker processes: Pillow holds the GIL for part of each decode and threads stop scaling after
about one core. Work goes out in chunks of consecutive rows (tens of images each, so the cost of a round trip
through the pool is small next to the decodes) and comes back in submission order, so the images reach the
writer in the same order with 1 or N workers and the cache is byte-identical either way.

Workers are started with ``spawn``: safe whatever threads the parent runs (torch, a loader), and the same on
every platform. Like any spawn-based pool (torch's DataLoader included), a script that calls the ingest must
guard its entry point with ``if __name__ == "__main__":``.
"""

from __future__ import annotations

import io
import math
import multiprocessing
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Union

import numpy as np

from shardstore.errors import ShardstoreError
from shardstore.store.writer import check_shard_memory

# A source image: a file path, or the encoded bytes of the file (a Hugging Face ``Image`` cell).
ImageInput = Union[str, Path, bytes]
# Each decoded input: the image (uint8 CHW), or the reason it could not be decoded.
Decoded = Union[np.ndarray, str]

DEFAULT_CHUNK_ROWS = 32


def default_workers() -> int:
    """Decoding processes when none are asked for: one per core, at most 4 (enough for the disk to keep up)."""
    return max(1, min(4, os.cpu_count() or 1))


def load_image(source: ImageInput, size: int) -> np.ndarray:
    """Decode an image, resize its shorter side to ``size``, center-crop to a square: uint8 CHW RGB."""
    from PIL import Image, UnidentifiedImageError  # Pillow is needed only for images

    if isinstance(source, bytes):
        if not source:
            raise ValueError("no image: the cell holds neither image bytes nor a file path")
        try:
            opened = Image.open(io.BytesIO(source))
        except UnidentifiedImageError:  # its own message names a BytesIO object's address
            raise UnidentifiedImageError(f"cannot identify an image format in {len(source):,} bytes") from None
    else:
        opened = Image.open(source)
    with opened as img:
        img.draft("RGB", (size, size))  # JPEG: decode at a reduced scale that is still >= size
        img = img.convert("RGB")
        w, h = img.size
        scale = size / min(w, h)
        new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((new_w, new_h), Image.Resampling.BILINEAR, reducing_gap=None)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        img = img.crop((left, top, left + size, top + size))
        return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()


def check_image_size(image_size: int, shard_size: int) -> None:
    """``ShardstoreError`` for an image size no image can be decoded to, or whose shard cannot be held in memory.

    Checked before any image is read: otherwise every image fails alike and is reported as "cannot decode".
    """
    from PIL import Image  # Pillow is needed only for images

    if image_size < 1:
        raise ShardstoreError(f"image size must be at least 1 pixel, got {image_size}")
    limit = Image.MAX_IMAGE_PIXELS
    if limit and image_size * image_size > limit:
        raise ShardstoreError(
            f"image size {image_size:,} makes {image_size * image_size:,}-pixel images, more than Pillow decodes "
            f"({limit:,} pixels); choose an image size of at most {math.isqrt(limit):,} (e.g. 64 or 224)"
        )
    check_shard_memory(shard_size, 3 * image_size * image_size + 16)  # images, labels and ids


def decode_chunk(inputs: Sequence[ImageInput], size: int) -> list[Decoded]:
    """Decode ``inputs`` in order; a failure is its one-line reason, so one bad image never stops a chunk."""
    out: list[Decoded] = []
    for source in inputs:
        try:
            out.append(load_image(source, size))
        except Exception as exc:  # noqa: BLE001 - Pillow raises many kinds; each is reported with its row
            out.append(" ".join(str(exc).split()) or type(exc).__name__)
    return out


def _start_worker(parent_pid: int) -> None:
    """Runs in each worker: Ctrl-C is the ingest's to handle, and the worker leaves when the ingest is gone.

    A SIGINT reaches the whole process group; the ingest stops its pool, so the workers ignore it rather
    than each print a traceback. A SIGKILLed ingest must not leave decoders behind: the worker's own parent
    may be a fork server rather than the ingest, so both are watched (the parent changing after it died, or
    the ingest's pid no longer running).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    own_parent = os.getppid()

    def watch() -> None:
        while os.getppid() == own_parent and _running(parent_pid):
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def decode_in_order(
    rows: np.ndarray,
    fetch: Callable[[np.ndarray], Sequence[ImageInput]],
    size: int,
    *,
    workers: int = 1,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> Iterator[tuple[int, Decoded]]:
    """Yield ``(row, image or reason)`` for each of ``rows`` in order, decoding ``workers`` chunks at a time.

    ``fetch(rows)`` returns the rows' inputs (paths or encoded bytes); it runs here, one chunk ahead of the
    decoders, so a source that lives in this process (a memory-mapped Arrow table) is read once and only the
    inputs travel. With one worker (or too few rows to share) everything runs in this process.
    """
    if workers < 1:
        raise ShardstoreError(f"workers must be at least 1, got {workers}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
    chunks = [rows[lo : lo + chunk_rows] for lo in range(0, len(rows), chunk_rows)]
    workers = min(workers, len(chunks))
    if workers <= 1:
        for chunk in chunks:
            yield from zip((int(r) for r in chunk), decode_chunk(fetch(chunk), size))
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                             initargs=(os.getpid(),)) as pool:
        pending: deque[tuple[np.ndarray, Future[list[Decoded]]]] = deque()
        next_chunk = 0
        try:
            while pending or next_chunk < len(chunks):
                # Two chunks per worker in flight: one decoding, one queued, so no worker waits on this loop.
                while next_chunk < len(chunks) and len(pending) < 2 * workers:
                    chunk = chunks[next_chunk]
                    pending.append((chunk, pool.submit(decode_chunk, list(fetch(chunk)), size)))
                    next_chunk += 1
                chunk, future = pending.popleft()
                try:
                    decoded = future.result()
                except BrokenProcessPool as exc:
                    raise ShardstoreError(
                        f"a decoding process died while decoding source rows {int(chunk[0])}..{int(chunk[-1])} "
                        f"({' '.join(str(exc).split()) or type(exc).__name__}); run again (finished shards are "
                        "kept), with --workers 1 to find an image that crashes the decoder"
                    ) from None
                yield from zip((int(r) for r in chunk), decoded)
        finally:
            for _, future in pending:
                future.cancel()
