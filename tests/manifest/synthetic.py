"""Format-3 tables for the tests: columns built with NumPy and written as a real snapshot, and ways to tamper with one.

A synthetic table needs no shard files: opening a store reads only the header and the
columns, so a million-shard cache costs tens of megabytes of columns and nothing else.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from shardstore.store.manifest import FieldSpec, Manifest
from shardstore.store.snapshot import write_manifest

TABLE_NAME = re.compile(r"^[0-9a-f]{16}-[0-9a-f]{8}\Z")

#: one field of 3x32x32 uint8 images: 3,072 bytes a sample
IMAGES = {"images": FieldSpec(np.dtype(np.uint8), (3, 32, 32))}


def synthetic_columns(fields: dict[str, FieldSpec], num_shards: int, *, samples: int = 2048,
                      offset: int = 128) -> dict[str, np.ndarray]:
    """The columns of ``num_shards`` native shards ``0..num_shards-1`` of ``samples`` rows each (mtimes 0)."""
    columns = {
        "id": np.arange(num_shards, dtype=np.int64),
        "samples": np.full(num_shards, samples, np.int64),
        "layout": np.zeros(num_shards, np.uint8),
        "digits": np.full(num_shards, 6, np.uint8),
        "since": np.zeros(num_shards, np.uint32),
    }
    for name, spec in fields.items():
        columns[f"{name}.offset"] = np.full(num_shards, offset, np.uint32)
        columns[f"{name}.mtime_ns"] = np.zeros(num_shards, np.int64)
        if spec.dtype.kind in "iu" and spec.shape in ((), (1,)):  # label-like: a value range column pair
            columns[f"{name}.min"] = np.ones(num_shards, np.int64)
            columns[f"{name}.max"] = np.zeros(num_shards, np.int64)
    return columns


def write_synthetic(root: Path, num_shards: int, fields: dict[str, FieldSpec] = IMAGES, **kwargs) -> Manifest:
    """Write a synthetic snapshot (header and table) into ``root``; no shard file is created."""
    root.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(fields, columns=synthetic_columns(fields, num_shards, **kwargs))
    write_manifest(root, manifest)
    return manifest


def header(root: Path) -> dict:
    """The format-3 header of the cache at ``root``."""
    return json.loads((root / "manifest.json").read_text())


def write_header(root: Path, doc: dict) -> None:
    (root / "manifest.json").write_text(json.dumps(doc, indent=1))


def table_dir(root: Path) -> Path:
    """The table directory the header names."""
    return root / header(root)["table"]


def table_dirs(root: Path) -> list[str]:
    """Names of the complete table directories in ``root/manifest.d`` (temporaries and other entries left out)."""
    return sorted(p.name for p in (root / "manifest.d").iterdir() if TABLE_NAME.match(p.name) and p.is_dir())


def replace_column(root: Path, column: str, content: np.ndarray | bytes) -> Path:
    """Put ``content`` (an array saved with ``np.save``, or raw bytes) where the table's ``column`` file is."""
    path = table_dir(root) / f"{column}.npy"
    tmp = path.with_name(f"{column}.edit")
    if isinstance(content, bytes):
        tmp.write_bytes(content)
    else:
        with open(tmp, "wb") as f:
            np.save(f, content, allow_pickle=content.dtype.hasobject)
    os.replace(tmp, path)
    return path


def column(root: Path, name: str) -> np.ndarray:
    """A private copy of the table's column ``name``."""
    return np.array(np.load(table_dir(root) / f"{name}.npy", allow_pickle=False))
