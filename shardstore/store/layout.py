"""Names on disk: native shard directories, flat ``<field>_<digits>.npy`` files, and writers' temporary names."""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path

from shardstore.errors import ManifestError

MANIFEST_NAME = "manifest.json"
#: Shard ids are stored as int64 everywhere (offsets, plans, checkpoints).
MAX_SHARD_ID = 2**63 - 1

_FIELD = r"[A-Za-z][A-Za-z0-9_]*"
FIELD_NAME = re.compile(rf"^{_FIELD}\Z")  # \Z: "$" would accept a trailing newline
NATIVE_DIR = re.compile(r"^shard_(\d+)$")
NATIVE_FILE = re.compile(rf"^({_FIELD})\.npy$")
FLAT_FILE = re.compile(rf"^({_FIELD}?)_(\d+)\.npy$")
# Temporary directories of a writer: ``.shard_000042.tmp-<pid>-<hex>``.
TEMP_DIR = re.compile(r"^\.shard_(\d+)\.tmp-(\d+)-[0-9a-f]+$")
# Temporary files of an atomic write (``temporary_sibling``): ``.<name>.tmp-<pid>-<hex>``.
TEMP_FILE = re.compile(r"^\..+\.tmp-(\d+)-[0-9a-f]+$")


def shard_dir_name(shard_id: int) -> str:
    """Directory name of a native shard, e.g. ``shard_000042``."""
    return f"shard_{shard_id:06d}"


def field_file_name(field: str) -> str:
    """File name of one field inside a native shard, e.g. ``images.npy``."""
    return f"{field}.npy"


def check_field_name(field: str) -> str:
    """Return ``field`` if it can name a file in both layouts, else raise ``ValueError`` with the rule."""
    if not FIELD_NAME.match(field):
        raise ValueError(
            f"field name {field!r} is not allowed; use a letter followed by letters, digits or underscores"
        )
    return field


def parse_shard_id(digits: str) -> int | None:
    """The shard id written as ``digits`` in a name, or None if it does not fit an int64."""
    # Checked on the string first: int() of a few thousand digits is slow or refused outright.
    if len(digits.lstrip("0")) > 19:
        return None
    value = int(digits)
    return value if value <= MAX_SHARD_ID else None


def _inside(resolved_root: str, real: str) -> bool:
    return real == resolved_root or real.startswith(resolved_root.rstrip(os.sep) + os.sep)


def is_within(resolved_root: str, path: str | Path) -> bool:
    """True if ``path`` (after resolving links and ``..``) lies inside ``resolved_root`` (already resolved)."""
    return _inside(resolved_root, os.path.realpath(path))


OUTSIDE_ROOT_FIX = "replace the symlink with the file itself, or move what it points to inside the cache root"


class OutsideRootError(ManifestError):
    """A path of the cache resolves (through a symlink) to a place outside the cache root; it is never read."""

    def __init__(self, rel: str, real: str) -> None:
        super().__init__(f"{rel} resolves to {real}, outside the cache root; {OUTSIDE_ROOT_FIX}")
        self.rel = rel
        self.real = real


def check_within(resolved_root: str, path: str | Path, rel: str | None = None) -> str:
    """The resolved ``path``, or ``OutsideRootError`` if it lies outside ``resolved_root``.

    The one check every reader of cache files goes through (discovery, the manifest build,
    verify, opening a store): a symlink out of the root is never followed, so nothing
    outside the root is read, hashed or printed.
    """
    real = os.path.realpath(path)
    if not _inside(resolved_root, real):
        raise OutsideRootError(rel if rel is not None else str(path), real)
    return real


def open_within(resolved_root: str, path: str | Path, rel: str | None = None, *, parents_checked: bool = False) -> int:
    """A read-only descriptor of ``path``, refusing one that resolves outside ``resolved_root``.

    With ``parents_checked`` the caller has already checked the directories above ``path``
    (discovery does, by name); then only a symlink in the last component costs a full
    resolution, so a scan of a million files stays at one ``open`` each.
    """
    # O_NONBLOCK: a FIFO put where a shard file should be must not hang the scan (it is refused below).
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
    fd = None
    if parents_checked:
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            if exc.errno != errno.ELOOP:  # ELOOP: the last component is a symlink; resolve it below
                raise
    if fd is None:
        fd = os.open(check_within(resolved_root, path, rel), flags)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    return fd
