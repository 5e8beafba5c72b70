"""The order in which an image ingest writes its source rows: seeded and recorded, so every job and restart agrees.

A cache written in source order puts one or two classes in each shard when the source is sorted by class
(an image folder always is, many datasets are), and shard-level sampling then draws single-class epochs and
evaluates held-out shards on the last classes only. So ``write`` shuffles the rows by default: output
position ``p`` holds source row ``order[p]``, where ``order`` is a pure function of the seed and the number
of source rows. Parallel jobs (disjoint shard ranges) and restarted jobs compute the same ``order``, and
``ROOT/order.json`` records which one the cache was written in, so a job with another seed, ``--no-shuffle``
or a source that grew is refused before it writes a shard that does not fit the others.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from pathlib import Path

import numpy as np

from shardstore.errors import ShardstoreError
from shardstore.store.atomic import write_bytes_atomic
from shardstore.store.layout import NATIVE_DIR, field_file_name, shard_dir_name
from shardstore.store.npy import load_array
from shardstore.store.writer import ShardWriter

ORDER_FILE = "order.json"
ORDER_FORMAT = 1
MAX_RECORD_BYTES = 1 << 20  # order.json is ~150 bytes, classes.json ~20 bytes a class
MAX_SEED = 2**64  # seeds below it; a larger one could not be told apart in a message or record


def read_small_json(path: Path) -> object:
    """The JSON value in ``path``: a regular file of at most 1 MiB, read without following a symbolic link.

    ``order.json`` and ``classes.json`` may come with a cache from someone else. A link there must not make
    the ingest read outside the root, a FIFO or ``/dev/zero`` must not hang it or fill its memory, and a deeply
    nested document must not crash the JSON parser: each is a ``ValueError`` (or ``OSError``) with the reason.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ValueError("it is a symbolic link, and nothing in a cache root is read through a link") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ValueError("not a regular file")
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_RECORD_BYTES + 1)
    if len(data) > MAX_RECORD_BYTES:
        raise ValueError(f"larger than {MAX_RECORD_BYTES:,} bytes")
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _is_int(value: object, limit: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < limit


def source_order(num_rows: int, shuffle_seed: int | None) -> np.ndarray:
    """Source rows in output order (int64): ``arange`` without a seed, else a seeded permutation.

    The permutation sorts one 64-bit PCG64 draw per row. NumPy keeps ``SeedSequence`` and the raw PCG64
    stream fixed across versions (unlike ``Generator.permutation``'s algorithm), so a job restarted under
    another NumPy still writes the same rows where the first one left off.
    """
    if num_rows < 0:
        raise ValueError(f"num_rows must be >= 0, got {num_rows}")
    if shuffle_seed is None:
        return np.arange(num_rows, dtype=np.int64)
    if isinstance(shuffle_seed, bool) or not isinstance(shuffle_seed, (int, np.integer)) or not (
            0 <= shuffle_seed < MAX_SEED):
        raise ShardstoreError(f"the shuffle seed must be a non-negative integer, got {shuffle_seed!r} "
                              "(the largest is 2**64 - 1)")
    draws = np.random.PCG64(np.random.SeedSequence(int(shuffle_seed))).random_raw(num_rows)
    return np.argsort(draws, kind="stable").astype(np.int64)


def _describe(seed: int | None, num_rows: int) -> str:
    way = "in source order (--no-shuffle)" if seed is None else f"shuffled with --shuffle-seed {seed}"
    return f"{num_rows:,} source rows {way}"


def record_order(root: Path, order: np.ndarray, shuffle_seed: int | None) -> None:
    """Write ``ROOT/order.json`` or check that the cache was written in this same order.

    A cache with shards but no ``order.json`` was written before orders were recorded, always in source
    order: it is continued only without shuffling. Refusals name the order the cache has and the fix.
    """
    path = root / ORDER_FILE
    record = {"format": ORDER_FORMAT, "shuffle_seed": shuffle_seed, "num_rows": int(order.shape[0]),
              "order_sha256": hashlib.sha256(np.ascontiguousarray(order, dtype="<i8").tobytes()).hexdigest()}
    wanted = _describe(shuffle_seed, record["num_rows"])
    # Shards first: a job writes order.json before its first shard, so a shard seen here implies the file exists
    # by the next line unless the cache predates order.json (no race with a parallel job starting at once).
    has_shards = any(NATIVE_DIR.match(entry.name) for entry in root.iterdir())
    if not path.exists():
        if has_shards and shuffle_seed is not None:
            raise ShardstoreError(
                f"{root} holds shards but no {ORDER_FILE}: they were written in source order, and this job asks for "
                f"{wanted}; pass --no-shuffle to continue this cache, or write to a new cache directory"
            )
        write_bytes_atomic(path, (json.dumps(record, indent=1) + "\n").encode())
        return
    fix = f"delete {root} (or write to a new cache directory) to start over with {wanted}"
    try:
        existing = read_small_json(path)
        seed, rows, digest = existing["shuffle_seed"], existing["num_rows"], existing["order_sha256"]  # type: ignore[index]
        if existing.get("format") != ORDER_FORMAT or not _is_int(rows, 2**63) or not isinstance(  # type: ignore[union-attr]
                digest, str) or not (seed is None or _is_int(seed, MAX_SEED)):
            raise ValueError("unexpected values")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ShardstoreError(f"{path}: not a readable record of the order the cache's rows were written in "
                              f"({' '.join(str(exc).split())}); {fix}") from None
    if (seed, rows) != (shuffle_seed, record["num_rows"]):
        flag = "--no-shuffle" if seed is None else f"--shuffle-seed {seed}"
        same_source = "" if rows == record["num_rows"] else (
            f"; the source now has {record['num_rows']:,} rows (the order depends on the number of rows)")
        raise ShardstoreError(f"{path}: this cache holds {_describe(seed, rows)}, this job asks for {wanted}; pass "
                              f"{flag} with the same source to continue it{same_source}, or {fix}")
    if digest != record["order_sha256"]:
        raise ShardstoreError(f"{path}: the order computed now differs from the one the cache was written in (same "
                              f"seed and rows, another permutation); {fix}")


def resume_position(writer: ShardWriter, order: np.ndarray, start: int, stop: int) -> int:
    """Output position after the last source row already on disk, from the ``ids`` of the last leading shard.

    The ids are checked against ``order``: one per row, each a source row, at increasing positions inside
    this job's part ``[start, stop)`` of the order and far enough along for the shards before it. A damaged
    file would otherwise move the resume point, past the end in the worst case, and the job would write
    nothing and report success.
    """
    skip = writer.samples_to_skip
    if not skip:
        return start
    k = (skip - 1) // writer.shard_size
    rows = skip - k * writer.shard_size
    shard_dir = writer.root / shard_dir_name(writer.shard_id(k))
    ids_path = shard_dir / field_file_name("ids")
    damaged = (f"an image ingest resumes after the last source row recorded there; delete {shard_dir} "
               "(it is written again) and run again")
    try:
        ids = load_array(ids_path, mmap=True)
    except FileNotFoundError:
        raise ShardstoreError(
            f"{shard_dir} has no ids.npy: an image ingest resumes after the last source row its shards record, so it "
            "cannot continue a cache written without ids; write the images to a new cache directory"
        ) from None
    except (OSError, ValueError) as exc:
        raise ShardstoreError(f"{ids_path}: unreadable ({' '.join(str(exc).split())}); {damaged}") from None
    if ids.shape != (rows,) or ids.dtype.kind not in "iu":
        raise ShardstoreError(f"{ids_path}: damaged (holds {ids.dtype} {list(ids.shape)}, expected {rows} integer "
                              f"ids, one per sample of the shard); {damaged}")
    ids = np.asarray(ids, dtype=np.int64)
    num_rows = order.shape[0]
    where = f"source rows at increasing positions {start + k * writer.shard_size}..{stop - 1} of the order"
    if ids.min() < 0 or ids.max() >= num_rows:
        raise ShardstoreError(f"{ids_path}: damaged (ids {int(ids.min())}..{int(ids.max())} are not all rows of the "
                              f"{num_rows:,}-row source); {damaged}")
    position_of = np.empty(num_rows, dtype=np.int64)
    position_of[order] = np.arange(num_rows, dtype=np.int64)
    positions = position_of[ids]
    last = int(positions[-1])
    if (np.any(np.diff(positions) <= 0) or int(positions[0]) < start + k * writer.shard_size or last >= stop
            or last - start + 1 < skip):
        raise ShardstoreError(f"{ids_path}: damaged (ids {int(ids[0])}..{int(ids[-1])} are not {rows} {where}); "
                              f"{damaged}")
    return last + 1
