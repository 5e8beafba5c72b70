"""The fields of shards already on disk, read from their headers: what a writer continuing a cache must match."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shardstore.errors import ShardstoreError
from shardstore.store.layout import NATIVE_FILE
from shardstore.store.npy import read_header_at

#: A field's dtype and per-sample shape: what every shard of a cache must agree on.
FieldSchema = dict[str, tuple[np.dtype, tuple[int, ...]]]


def read_shard_fields(shard_dir: Path) -> FieldSchema:
    """``{field: (dtype, per-sample shape)}`` of a complete native shard, from its files' headers."""
    fields: FieldSchema = {}
    for path in sorted(shard_dir.iterdir()):
        m = NATIVE_FILE.match(path.name)
        if m:
            header = read_header_at(str(path))
            fields[m.group(1)] = (header.dtype, tuple(header.shape[1:]))
    return fields


def describe_field(name: str, field: tuple[np.dtype, tuple[int, ...]] | None) -> str:
    """``images uint8 [3, 64, 64]`` (``no images`` for None): a field as a message shows it."""
    return f"no {name}" if field is None else f"{name} {np.dtype(field[0]).name} {list(field[1])}"


def group_fields(root: Path) -> set[str] | None:
    """Fields that groups (e.g. cached teacher targets) added to the shards; None when the declarations are broken."""
    from shardstore.store.groups import read_group_specs  # (groups imports the writer, which imports this)

    try:
        return {name for spec in read_group_specs(root).values() for name in spec.fields}
    except ShardstoreError:
        return None
