"""Names on disk: native shard directories, flat ``<field>_<digits>.npy`` files, and writers' temporary names."""

from __future__ import annotations

import os
import re
from pathlib import Path

MANIFEST_NAME = "manifest.json"

_FIELD = r"[A-Za-z][A-Za-z0-9_]*"
FIELD_NAME = re.compile(rf"^{_FIELD}$")
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


def is_temporary(name: str) -> bool:
    """True for names that writers own while a file or shard is incomplete; readers skip them silently."""
    return name.startswith(".") or ".tmp" in name or name.endswith((".part", ".partial", "~"))


def check_field_name(field: str) -> str:
    """Return ``field`` if it can name a file in both layouts, else raise ``ValueError`` with the rule."""
    if not FIELD_NAME.match(field):
        raise ValueError(
            f"field name {field!r} is not allowed; use a letter followed by letters, digits or underscores"
        )
    return field


def is_within(resolved_root: str, path: str | Path) -> bool:
    """True if ``path`` (after resolving links and ``..``) lies inside ``resolved_root`` (already resolved)."""
    real = os.path.realpath(path)
    return real == resolved_root or real.startswith(resolved_root.rstrip(os.sep) + os.sep)
