"""``ShardWriter``: fills fixed-size native shards, each made visible only when complete (crash-safe, resumable)."""

from __future__ import annotations

import errno
import logging
import os
import secrets
import shutil
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from shardstore.errors import WriterError
from shardstore.store.atomic import disk_full_error, format_bytes, fsync_dir, is_disk_full, pid_alive
from shardstore.store.layout import (
    NATIVE_DIR,
    NATIVE_FILE,
    TEMP_DIR,
    check_field_name,
    field_file_name,
    shard_dir_name,
)
from shardstore.store.npy import read_header_at
from shardstore.store.shard_fields import describe_field, group_fields, read_shard_fields

log = logging.getLogger(__name__)

#: ``ROOT/.shardstore-journal``: one line per native shard a writer finished, appended after the rename:
#: ``shard_000042 <inode> <mtime_ns> images labels`` (inode and mtime of the directory). ``build-manifest``
#: takes a shard's file names from it instead of listing the directory while the directory's inode and
#: mtime are the recorded ones (a file added, removed or renamed in it changes its mtime). It is advice:
#: a cache without it (or with a torn last line) is listed as usual.
JOURNAL_NAME = ".shardstore-journal"


def physical_memory_bytes() -> int | None:
    """This machine's RAM, or None where the system does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def check_shard_memory(shard_size: int, sample_bytes: int) -> None:
    """``WriterError`` when one shard's buffer (``shard_size`` samples) could not fit in this machine's memory.

    A writer holds a whole shard in memory before writing it; a mistyped size (``10**12``) would
    otherwise fail deep inside NumPy, or page the machine to a halt, long after the job started.
    """
    memory = physical_memory_bytes()
    need = shard_size * sample_bytes
    if memory is None or need <= memory:
        return
    if sample_bytes > memory // 4:
        raise WriterError(f"one sample of {format_bytes(sample_bytes)} is too large for this machine's "
                          f"{format_bytes(memory)} of memory; store smaller samples")
    raise WriterError(
        f"shard_size {shard_size:,} with {sample_bytes:,} bytes per sample needs {format_bytes(need)} of memory for "
        f"one shard's buffer, more than this machine's {format_bytes(memory)}; choose a smaller shard_size "
        f"(at most {memory // sample_bytes // 4:,} here; 2048 is usual)"
    )


def write_npy(f: BinaryIO, array: np.ndarray) -> None:
    """Write ``array`` as a ``.npy`` file (the header NumPy writes, then the raw C-order bytes) to ``f``.

    Plain file writes, so a full disk raises ``OSError(ENOSPC)``: ``np.save`` goes through ``ndarray.tofile``,
    whose short write is an ``OSError`` without an errno ("N requested and M written").
    """
    array = np.asarray(array, order="C")  # (ascontiguousarray would turn a 0-d array into 1-d)
    header = np.lib.format.header_data_from_array_1_0(array)
    try:
        np.lib.format.write_array_header_1_0(f, header)
    except ValueError:  # a header longer than 64 KiB (a very long shape or dtype description)
        np.lib.format.write_array_header_2_0(f, header)
    f.write(memoryview(array.reshape(-1).view(np.uint8)))


def _existing_shard_rows(shard_dir: Path) -> int:
    """Sample count of a complete native shard, from the header of its first field file."""
    files = sorted(p for p in shard_dir.iterdir() if NATIVE_FILE.match(p.name))
    if not files:
        raise WriterError(f"{shard_dir} holds no field files; delete it so the writer can rewrite it")
    try:
        header = read_header_at(str(files[0]))
    except (OSError, ValueError) as exc:
        raise WriterError(f"{files[0]}: unreadable header ({exc}); delete {shard_dir} so it is rewritten") from exc
    return header.shape[0] if header.shape else 0


class ShardWriter:
    """Write samples into native shards ``ROOT/shard_<id>/<field>.npy`` of ``shard_size`` rows each.

    The writer owns the shard ids ``start_shard + k * stride`` for ``k < num_shards``
    (unbounded when ``num_shards`` is None), so several processes can fill disjoint
    ids of one cache at once. Sample ``p`` of this writer's input goes to its shard
    ``p // shard_size``. Each shard is written to a hidden temporary directory,
    fsynced, then renamed into place: a reader sees a whole shard or none.

    Restarted after a crash with the same input, the writer discards the samples of
    shards that already exist (``samples_to_skip`` tells a producer how many leading
    samples it may skip without decoding) and writes only the missing shards.
    Only the last shard of a writer may be short; it is written by ``close()``, and
    never when the ``with`` block exits on an exception. With ``journal`` each finished
    shard is appended to ``ROOT/.shardstore-journal`` (its directory's inode, mtime and
    file names), which lets ``build-manifest`` skip listing the directory.

    A cache has one dtype and per-sample shape per field: a writer whose samples differ from the
    shards already in the root (another image size, say) is refused at its first sample, before
    it writes anything; otherwise its shards, or the older ones, would be left out of the manifest.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        shard_size: int = 2048,
        *,
        start_shard: int = 0,
        num_shards: int | None = None,
        stride: int = 1,
        fsync: bool = True,
        journal: bool = False,
    ) -> None:
        if shard_size < 1:
            raise WriterError(f"shard_size must be at least 1, got {shard_size}")
        if start_shard < 0 or stride < 1 or (num_shards is not None and num_shards < 1):
            raise WriterError(
                f"invalid shard range start_shard={start_shard}, num_shards={num_shards}, stride={stride}; "
                "use start_shard >= 0, num_shards >= 1 (or None) and stride >= 1"
            )
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise WriterError(f"{self.root} exists and is not a directory; choose a directory for the cache")
        self.root.mkdir(parents=True, exist_ok=True)
        self.shard_size = int(shard_size)
        self.start_shard = int(start_shard)
        self.num_shards = num_shards
        self.stride = int(stride)
        self.fsync = fsync

        self._schema: dict[str, tuple[np.dtype, tuple[int, ...]]] | None = None
        self._buffers: dict[str, np.ndarray] = {}
        self._fill = 0  # rows buffered for the current shard
        self._position = 0  # samples of this writer's input seen so far
        self._closed = False
        self.samples_written = 0
        self.samples_skipped = 0
        self.shards_written: list[int] = []
        self._journal_fd: int | None = None
        self._journal_ok = journal

        self._reference_shard: Path | None = None  # a complete shard already in the root (any writer's)
        self._remove_stale_temporaries()
        self._existing = self._find_existing_shards()
        self.samples_to_skip = self._count_leading_complete()

    # -- the shard range ---------------------------------------------------------------

    def shard_id(self, k: int) -> int:
        """Id of this writer's ``k``-th shard."""
        return self.start_shard + k * self.stride

    def _owns(self, shard_id: int) -> int | None:
        offset = shard_id - self.start_shard
        if offset < 0 or offset % self.stride:
            return None
        k = offset // self.stride
        if self.num_shards is not None and k >= self.num_shards:
            return None
        return k

    def _remove_stale_temporaries(self) -> None:
        for entry in self.root.iterdir():
            m = TEMP_DIR.match(entry.name)
            if m and self._owns(int(m.group(1))) is not None and not pid_alive(int(m.group(2))):
                log.info("removing %s left by a writer that stopped", entry)
                shutil.rmtree(entry, ignore_errors=True)

    def _find_existing_shards(self) -> dict[int, int]:
        """``{k: rows}`` for the complete shards of this writer's range already on disk."""
        found: dict[int, int] = {}
        reference = -1
        for entry in self.root.iterdir():
            m = NATIVE_DIR.match(entry.name)
            if m and entry.is_dir():
                if reference < 0 or int(m.group(1)) < reference:
                    reference, self._reference_shard = int(m.group(1)), entry
                k = self._owns(int(m.group(1)))
                if k is not None:
                    found[k] = _existing_shard_rows(entry)
        last = max(found, default=-1)
        for k, rows in found.items():
            if rows > self.shard_size or (rows < self.shard_size and k != last):
                raise WriterError(
                    f"{self.root / shard_dir_name(self.shard_id(k))} has {rows} rows but shards of this writer "
                    f"hold {self.shard_size}; pass the shard_size it was written with, or delete that shard"
                )
        return found

    def _count_leading_complete(self) -> int:
        k = 0
        skip = 0
        while k in self._existing:
            skip += self._existing[k]
            if self._existing[k] < self.shard_size:
                break
            k += 1
        return skip

    def skip_existing(self) -> int:
        """Advance past the leading shards already on disk without being given their samples.

        Call it before the first ``add`` when the producer can skip its first
        ``samples_to_skip`` inputs cheaply (e.g. without decoding them). Returns that count.
        """
        if self._position:
            raise WriterError("skip_existing() must be called before any sample is added")
        self._position = self.samples_to_skip
        self.samples_skipped += self.samples_to_skip
        return self.samples_to_skip

    @property
    def existing_shards(self) -> list[int]:
        """Ids of this writer's shards that were complete on disk when it started."""
        return sorted(self.shard_id(k) for k in self._existing)

    # -- taking samples ----------------------------------------------------------------

    def check_fields(self, fields: Mapping[str, tuple[np.dtype, tuple[int, ...]]]) -> None:
        """``WriterError`` when shards already in the root have other fields, dtypes or per-sample shapes.

        Called with the first sample; a producer that knows its fields before decoding anything may call it
        first. Fields that groups added to the existing shards (cached teacher targets) are not compared.
        """
        if self._reference_shard is None:
            return
        try:
            existing = read_shard_fields(self._reference_shard)
        except (OSError, ValueError) as exc:  # build-manifest reports a damaged shard; this one proves nothing
            log.warning("%s: cannot read its headers (%s); not compared with the new samples",
                        self._reference_shard, exc)
            return
        groups = group_fields(self.root)
        if groups is not None:
            existing = {n: f for n, f in existing.items() if n not in groups}
        new = {n: (np.dtype(d), tuple(int(x) for x in s)) for n, (d, s) in fields.items()}
        # With unreadable group declarations, a field only the old shards have may be a group's: not compared.
        names = [*new, *(n for n in existing if n not in new and groups is not None)]
        differ = [n for n in names if existing.get(n) != new.get(n)]
        if not differ:
            return
        raise WriterError(
            f"{self.root} holds shards ({self._reference_shard.name}, ...) with "
            f"{', '.join(describe_field(n, existing.get(n)) for n in differ)}, this write gives "
            f"{', '.join(describe_field(n, new.get(n)) for n in differ)}; a cache has one dtype and per-sample shape "
            "per field (other shards would be left out of its manifest): write to a new cache directory"
        )

    def _set_schema(self, sample: Mapping[str, Any], batched: bool) -> None:
        schema = {}
        for name, value in sample.items():
            check_field_name(name)
            arr = np.asarray(value)
            if arr.dtype.hasobject or arr.dtype.fields is not None:
                raise WriterError(f"field {name!r} has dtype {arr.dtype}; store plain numeric arrays (no objects)")
            shape = arr.shape[1:] if batched else arr.shape
            schema[name] = (arr.dtype, tuple(int(d) for d in shape))
        if not schema:
            raise WriterError("a sample must have at least one field, e.g. {'images': array}")
        self.check_fields(schema)
        sample_bytes = sum(d.itemsize * int(np.prod(s, dtype=object)) for d, s in schema.values())
        check_shard_memory(self.shard_size, sample_bytes)
        try:
            buffers = {n: np.empty((self.shard_size, *s), dtype=d) for n, (d, s) in schema.items()}
        except (MemoryError, ValueError) as exc:  # below the machine's memory, but not available now
            raise WriterError(f"cannot hold one shard of {self.shard_size:,} samples x {sample_bytes:,} bytes in "
                              f"memory ({exc}); choose a smaller shard_size") from None
        self._schema = schema
        self._buffers = buffers

    def _checked(self, batch: Mapping[str, Any], batched: bool) -> tuple[dict[str, np.ndarray], int]:
        if self._closed:
            raise WriterError("this ShardWriter is closed; create a new one to add samples")
        if self._schema is None:
            self._set_schema(batch, batched)
        assert self._schema is not None
        if set(batch) != set(self._schema):
            raise WriterError(f"sample has fields {sorted(batch)} but the writer expects {sorted(self._schema)}")
        arrays: dict[str, np.ndarray] = {}
        count = None
        for name, (dtype, shape) in self._schema.items():
            value = batch[name]
            arr = np.asarray(value) if isinstance(value, (np.ndarray, np.generic)) else np.asarray(value, dtype=dtype)
            if arr.dtype != dtype and not np.can_cast(arr.dtype, dtype, casting="safe"):
                raise WriterError(f"field {name!r} has dtype {arr.dtype}, expected {dtype} like the first sample")
            got = arr.shape[1:] if batched else arr.shape
            if got != shape:
                raise WriterError(f"field {name!r} has per-sample shape {got}, expected {shape} like the first sample")
            n = arr.shape[0] if batched else 1
            if count is not None and n != count:
                raise WriterError(f"batch fields have different lengths ({count} and {n} for {name!r})")
            count = n
            arrays[name] = arr if batched else arr[None]
        return arrays, int(count or 0)

    def add(self, sample: Mapping[str, Any]) -> None:
        """Add one sample: a mapping of field name to array (or scalar)."""
        arrays, _ = self._checked(sample, batched=False)
        self._take(arrays, 1)

    def add_batch(self, batch: Mapping[str, Any]) -> None:
        """Add ``n`` samples at once: every field is an array whose first dimension is ``n``."""
        arrays, n = self._checked(batch, batched=True)
        self._take(arrays, n)

    def extend(self, samples: Iterable[Mapping[str, Any]]) -> None:
        """Add every sample of an iterable."""
        for sample in samples:
            self.add(sample)

    def _take(self, arrays: dict[str, np.ndarray], n: int) -> None:
        done = 0
        while done < n:
            k, row = divmod(self._position, self.shard_size)
            if self.num_shards is not None and k >= self.num_shards:
                raise WriterError(
                    f"the writer's range of {self.num_shards} shards x {self.shard_size} samples is full; "
                    "give it a larger num_shards or start another writer at the next free shard id"
                )
            take = min(n - done, self.shard_size - row)
            if k in self._existing:
                rows = self._existing[k]
                if row + take > rows:
                    raise WriterError(
                        f"{shard_dir_name(self.shard_id(k))} already exists with {rows} samples, fewer than "
                        "this input gives it; its writer had finished. Write the new samples to a new shard range"
                    )
                self.samples_skipped += take
            else:
                for name, arr in arrays.items():
                    self._buffers[name][self._fill : self._fill + take] = arr[done : done + take]
                self._fill += take
            done += take
            self._position += take
            if self._position % self.shard_size == 0 and self._fill:
                self._write_shard(k, self._fill)

    # -- writing -----------------------------------------------------------------------

    def _write_shard(self, k: int, rows: int) -> None:
        shard_id = self.shard_id(k)
        final = self.root / shard_dir_name(shard_id)
        tmp = self.root / f".{shard_dir_name(shard_id)}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            tmp.mkdir()
            for name, buf in self._buffers.items():
                with open(tmp / field_file_name(name), "wb") as f:
                    write_npy(f, buf[:rows])
                    f.flush()
                    if self.fsync:
                        os.fsync(f.fileno())
            if self.fsync:
                fsync_dir(tmp)
            try:
                os.rename(tmp, final)
            except OSError as exc:
                raise WriterError(
                    f"{final} appeared while this writer was writing it; two writers share shard ids "
                    "(give each writer its own start_shard/num_shards)"
                ) from exc
        except BaseException as exc:
            # Whatever stopped the write, no part of this shard stays behind; earlier shards are untouched.
            shutil.rmtree(tmp, ignore_errors=True)
            if is_disk_full(exc):
                need = sum(buf[:rows].nbytes + 128 for buf in self._buffers.values())  # 128: a .npy header
                raise disk_full_error(final, need) from exc
            raise
        if self.fsync:
            fsync_dir(self.root)
        self._fill = 0
        self.samples_written += rows
        self.shards_written.append(shard_id)
        self._journal(final)

    def _journal(self, final: Path) -> None:
        """Append ``final`` and its files to the cache's journal; a journal that cannot be written is skipped.

        One ``write`` of one short line on an ``O_APPEND`` descriptor, so lines of writers in other
        processes never interleave. A line torn by a crash is ignored by its readers; the next
        writer starts on a new line.
        """
        if not self._journal_ok:
            return
        try:
            st = os.stat(final)
            line = f"{final.name} {st.st_ino} {st.st_mtime_ns} {' '.join(self._buffers)}\n".encode()
            if self._journal_fd is None:
                flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
                fd = os.open(self.root / JOURNAL_NAME, flags, 0o644)
                self._journal_fd = fd
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise OSError(errno.EINVAL, "not a regular file")
                if st.st_size and os.pread(fd, 1, st.st_size - 1) != b"\n":
                    line = b"\n" + line  # a torn line of a killed writer: start a new one
            if os.write(self._journal_fd, line) != len(line):
                raise OSError(errno.ENOSPC, "short write")
            if self.fsync:
                os.fsync(self._journal_fd)
        except OSError as exc:
            log.warning("%s: not recorded in %s (%s); build-manifest lists the shard's directory instead",
                        final, JOURNAL_NAME, exc.strerror or exc)
            self._journal_ok = False
            self._close_journal()

    def _close_journal(self) -> None:
        if self._journal_fd is not None:
            os.close(self._journal_fd)
            self._journal_fd = None

    def close(self) -> None:
        """Write the buffered samples as the writer's last (possibly short) shard."""
        if self._closed:
            return
        if self._fill:
            k = (self._position - 1) // self.shard_size
            self._write_shard(k, self._fill)
        self._closed = True
        self._buffers = {}
        self._close_journal()

    def abort(self) -> None:
        """Drop buffered samples without writing them; complete shards stay as they are."""
        self._closed = True
        self._fill = 0
        self._buffers = {}
        self._close_journal()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        # A failure upstream must not leave a short shard in the middle of the range.
        if exc_type is None:
            self.close()
        else:
            self.abort()
