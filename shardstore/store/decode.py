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
import logging
import math
import multiprocessing
import os
import signal
import stat
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from shardstore.errors import ShardstoreError
from shardstore.store.writer import check_shard_memory

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

# A source image: a file path, or the encoded bytes of the file (a Hugging Face ``Image`` cell).
ImageInput = str | Path | bytes
# Each decoded input: the image (uint8 CHW), or the reason it could not be decoded.
Decoded = np.ndarray | str

DEFAULT_CHUNK_ROWS = 32


def default_workers() -> int:
    """Decoding processes when none are asked for: one per core, at most 4 (enough for the disk to keep up)."""
    return max(1, min(4, os.cpu_count() or 1))


def _check_regular_file(path: str | Path) -> None:
    """A FIFO or a device named like an image would block a decoder forever (or feed it endless bytes)."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise ValueError(f"{path} is not a regular file")


def _to_8_bit(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float images scaled to 0..255: ``convert("RGB")`` alone clips them.

    Pillow clips to 0..255 when it converts these modes, which turns a 16-bit PNG nearly white and a
    float TIFF in 0..1 black. Integer images are taken as 16-bit (``I`` only when a value exceeds 255),
    float images as 0..1 when no value exceeds 1, else as 0..255.
    """
    from PIL import Image

    if not (img.mode.startswith("I") or img.mode == "F"):
        return img
    values = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16") or (img.mode == "I" and values.size and values.max() > 255):
        values = values * (255 / 65535)
    elif img.mode == "F" and values.size and np.nanmax(values) <= 1:
        values = values * 255
    return Image.fromarray(np.nan_to_num(values).clip(0, 255).round().astype(np.uint8), "L")


def load_image(source: ImageInput, size: int) -> np.ndarray:
    """Decode an image, resize its shorter side to ``size``, center-crop to a square: uint8 CHW RGB.

    An image between Pillow's ``MAX_IMAGE_PIXELS`` and twice that only warns in Pillow (beyond, it raises
    ``DecompressionBombError``); here it is refused as well unless it is a JPEG, which is decoded at a reduced
    scale: a decoder never holds hundreds of megabytes for one image, and the reason is reported with its row.
    """
    from PIL import Image, UnidentifiedImageError  # Pillow is needed only for images

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", Image.DecompressionBombWarning)
        if isinstance(source, bytes):
            if not source:
                raise ValueError("no image: the cell holds neither image bytes nor a file path")
            try:
                opened = Image.open(io.BytesIO(source))
            except UnidentifiedImageError:  # its own message names a BytesIO object's address
                raise UnidentifiedImageError(f"cannot identify an image format in {len(source):,} bytes") from None
        else:
            _check_regular_file(source)
            opened = Image.open(source)
    with opened as img:
        bombs = [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
        if bombs and img.format != "JPEG":
            raise Image.DecompressionBombError(" ".join(str(bombs[0].message).split()))
        img.draft("RGB", (size, size))  # JPEG: decode at a reduced scale that is still >= size
        img = _to_8_bit(img).convert("RGB")
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
    if workers > (os.cpu_count() or 1):
        log.warning("%d decoding processes on %d CPU cores: more than one per core only costs memory and start-up "
                    "time (pass --workers %d or fewer)", workers, os.cpu_count() or 1, os.cpu_count() or 1)
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=(os.getpid(),))
    pending: deque[tuple[np.ndarray, Future[list[Decoded]]]] = deque()
    next_chunk = 0
    try:
        while pending or next_chunk < len(chunks):
            # Two chunks per worker in flight: one decoding, one queued, so no worker waits on this loop.
            while next_chunk < len(chunks) and len(pending) < 2 * workers:
                chunk = chunks[next_chunk]
                inputs = list(fetch(chunk))
                try:
                    with _sigint_held():  # submit() may start a worker process
                        pending.append((chunk, pool.submit(decode_chunk, inputs, size)))
                except BrokenProcessPool as exc:
                    if not pending:
                        raise _died(chunk, exc) from None
                    break  # a worker died: the chunks in flight say which rows it was decoding
                next_chunk += 1
            chunk, future = pending.popleft()
            try:
                decoded = future.result()
            except BrokenProcessPool as exc:
                raise _died(chunk, exc) from None
            yield from zip((int(r) for r in chunk), decoded)
    except BaseException:  # an error, Ctrl-C, or the consumer closing this generator: stop at once
        _abandon(pool)
        raise
    pool.shutdown(wait=True)


def _died(chunk: np.ndarray, exc: BaseException) -> ShardstoreError:
    return ShardstoreError(
        f"a decoding process died while decoding {_name_rows(chunk)} "
        f"({' '.join(str(exc).split()) or type(exc).__name__}); run again (finished shards are kept), with "
        "--workers 1 to find an image that crashes the decoder"
    )


def _name_rows(chunk: np.ndarray, shown: int = 4) -> str:
    """``source rows 6..8``, or ``source rows 7, 3, 12, 40 and 28 more`` for a chunk of a shuffled order."""
    if len(chunk) > 1 and np.all(np.diff(chunk) == 1):
        return f"source rows {int(chunk[0])}..{int(chunk[-1])}"
    rows = ", ".join(str(int(r)) for r in chunk[:shown])
    more = f" and {len(chunk) - shown} more" if len(chunk) > shown else ""
    return f"source row{'s' if len(chunk) > 1 else ''} {rows}{more}"


@contextmanager
def _sigint_held() -> Iterator[None]:
    """Hold Ctrl-C back while this thread may start a worker, then act on it.

    A process inherits the signal mask, so with SIGINT blocked here a worker never gets the Ctrl-C sent to the
    whole process group while it is still starting (it would die with a traceback before its initializer
    ignores SIGINT, and could wedge the pool). In the main thread the Python handler is swapped too: a SIGINT
    taken by another thread (a progress bar's) would otherwise raise ``KeyboardInterrupt`` here in the middle
    of handing a new worker its start-up data. A Ctrl-C that came meanwhile is acted on when this block ends.
    """
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    in_main = threading.current_thread() is threading.main_thread()
    received: list[int] = []
    handler = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum)) if in_main else None
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # one pending is delivered now, to either handler
        if in_main:
            signal.signal(signal.SIGINT, handler)
            if received and callable(handler):
                handler(signal.SIGINT, None)
            elif received and handler == signal.SIG_DFL:
                raise KeyboardInterrupt


def _abandon(pool: ProcessPoolExecutor) -> None:
    """Stop the pool without waiting for the chunks it is decoding: queued ones are dropped, workers killed.

    The pool cancels the queued chunks itself (``cancel_futures``): cancelling them from here races with its
    management thread, which then fails and leaves its queue feeder blocked on a pipe no worker reads, and the
    interpreter hangs at exit. The worker processes are ended rather than waited on, since a chunk of large or
    hostile images can decode for a long time; ``ProcessPoolExecutor`` has no public call for that.
    """
    pool.shutdown(wait=False, cancel_futures=True)
    workers = [p for p in (getattr(pool, "_processes", None) or {}).values()]
    for process in workers:
        process.terminate()
    for process in workers:
        process.join(timeout=5)
