"""Crash-safe writes: write under a temporary name, fsync, rename into place, fsync the directory.

Every file the project replaces as a whole (the manifest, group declarations, checkpoints,
``best.pt``, ``latest.json``, metrics) goes through :func:`write_atomic`, so a reader sees the
old file or the new one and never a mix, a full disk is one :class:`DiskFullError` naming the
path and the space needed (the temporary is removed, the old file kept), and the temporaries a
killed writer left behind are recognisable (``.<name>.tmp-<pid>-<hex>``) and removed by
:func:`remove_stale_temporaries` once their writer is gone.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from shardstore.errors import DiskFullError
from shardstore.store.layout import TEMP_FILE

_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG}


def fsync_dir(path: Path) -> None:
    """Make a rename or creation inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    """True if a process ``pid`` exists (a writer whose temporaries must not be deleted)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # a number no process can have
        return False
    except PermissionError:
        return True
    return True


def temporary_sibling(path: Path) -> Path:
    """A hidden name next to ``path`` that no reader mistakes for a finished file."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def format_bytes(n: int) -> str:
    """``1,234 bytes``, ``5.2 MB``: a size for a message (decimal units)."""
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:,} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return str(n)


def is_disk_full(exc: BaseException) -> bool:
    """True for the ``OSError`` a full disk (or an exhausted quota) raises."""
    return isinstance(exc, OSError) and exc.errno in _NO_SPACE


def disk_full_error(path: str | os.PathLike[str], needed_bytes: int | None) -> DiskFullError:
    """The one-line error for a write to ``path`` that ran out of space (needing ``needed_bytes`` in all)."""
    path = Path(path)
    try:
        free = shutil.disk_usage(path.parent if not path.is_dir() else path).free
    except OSError:
        free = None
    # Only a figure that explains the failure: a file system's block and metadata overhead can leave a little
    # more free than the file's bytes (measured after the temporary is gone) and still fail the write.
    explains = free is not None and (needed_bytes is None or free < needed_bytes)
    free_s = f", {format_bytes(free)} free" if explains else ""
    need = f" needs {format_bytes(needed_bytes)}" if needed_bytes is not None else " needs more space"
    return DiskFullError(f"no space left on device: writing {path}{need}{free_s}; free space on that "
                         "file system (or choose another directory) and run again — nothing was replaced")


def write_atomic(path: str | os.PathLike[str], write: Callable[[BinaryIO], object], *, fsync: bool = True,
                 size_hint: int | None = None) -> None:
    """Replace ``path`` with what ``write(f)`` writes to an open binary file, all or nothing.

    The data goes to a temporary sibling, is flushed and fsynced, then renamed over ``path``
    and the directory fsynced. On any error (a full disk included) the temporary is deleted
    and ``path`` keeps its previous content. ``size_hint`` (bytes) only improves the message.
    """
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            size = tmp.stat().st_size
        except OSError:
            size = None
        tmp.unlink(missing_ok=True)
        if is_disk_full(exc):
            raise disk_full_error(path, size_hint if size_hint is not None else size) from exc
        raise
    if fsync:
        fsync_dir(path.parent)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes, *, fsync: bool = True) -> None:
    """Replace ``path`` with ``data`` so a reader sees the old file or the new one, never a mix."""
    write_atomic(path, lambda f: f.write(data), fsync=fsync, size_hint=len(data))


def remove_stale_temporaries(directory: str | os.PathLike[str], name: str | None = None) -> int:
    """Delete ``.<name>.tmp-<pid>-<hex>`` files in ``directory`` whose writer process is gone.

    With ``name`` only the temporaries of that file are considered. Files of a live writer
    (another process still writing) are kept. Returns the number removed.
    """
    removed = 0
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return 0
    for entry in entries:
        m = TEMP_FILE.match(entry.name)
        if not m or (name is not None and not entry.name.startswith(f".{name}.tmp-")):
            continue
        if entry.is_file(follow_symlinks=False) and not pid_alive(int(m.group(1))):
            try:
                os.unlink(entry.path)
                removed += 1
            except FileNotFoundError:
                pass
    return removed
