"""``ShardStore``: a cache opened through its manifest, each shard field a read-only memory map on demand."""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from shardstore import kernels
from shardstore.errors import ManifestError
from shardstore.manifest.model import FieldSpec, Manifest, ShardEntry, manifest_path
from shardstore.store.layout import OutsideRootError, check_within
from shardstore.store.mmaps import MapCache, shrunk_error

log = logging.getLogger(__name__)


def load_manifest(root: str | os.PathLike[str]) -> Manifest:
    """Read and validate ``root/manifest.json``; ``ManifestError`` with the fix when it is missing or bad."""
    root = Path(root)
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is not a directory"
        raise ManifestError(f"{root} {what}; pass the cache directory that holds manifest.json")
    path = manifest_path(root)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ManifestError(f"{path} does not exist; run `shardstore build-manifest {root}` first") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: cannot be read ({exc}); rebuild it with `shardstore build-manifest {root}`") from None
    return Manifest.from_json(text, str(path))


class ShardStore:
    """Read access to a cache: global sample ids in shard-id order, fields as zero-copy read-only arrays."""

    def __init__(self, root: Path, manifest: Manifest, *, max_open_maps: int = 64) -> None:
        self.root = root
        self.manifest = manifest
        self._maps = MapCache(max_open_maps)
        counts = np.array([s.num_samples for s in manifest.shards], dtype=np.int64)
        #: ``offsets[p]`` is the global id of shard position ``p``'s first sample; ``offsets[-1]`` the total.
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.shard_ids = np.array([s.id for s in manifest.shards], dtype=np.int64)
        self._complete = {n: f for n, f in manifest.fields.items() if all(n in s.files for s in manifest.shards)}

    @classmethod
    def open(cls, root: str | os.PathLike[str], *, max_open_maps: int = 64, check_files: bool = True) -> ShardStore:
        """Open the cache at ``root`` through its manifest.

        With ``check_files`` (the default) every listed file must still exist with the
        size it had when the manifest was built; a file that merely has a new mtime is
        reported with a warning.
        """
        root = Path(root)
        manifest = load_manifest(root)
        if not manifest.shards:
            raise ManifestError(f"{manifest_path(root)} lists no shards; write some and rebuild the manifest")
        touched = 0
        resolved_root = os.path.realpath(root)
        for shard in manifest.shards:
            for f in shard.files.values():
                path = root / f.path
                try:
                    check_within(resolved_root, path, f.path)
                except OutsideRootError as exc:
                    # Not "rebuild it": the symlink is still there and a rebuild leaves the shard out.
                    raise ManifestError(f"{manifest_path(root)} lists {exc}, then run "
                                        f"`shardstore build-manifest {root}`") from None
                if not check_files:
                    continue
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    raise ManifestError(
                        f"{path}: listed in the manifest but missing; run `shardstore build-manifest {root}`"
                    ) from None
                if st.st_size != f.bytes:
                    raise ManifestError(
                        f"{path}: changed size since the manifest was built ({f.bytes:,} -> {st.st_size:,} bytes); "
                        f"run `shardstore build-manifest {root}`"
                    )
                touched += st.st_mtime_ns != f.mtime_ns
        if touched:
            log.warning("%d shard files in %s have a new mtime but the same size; rebuild the manifest if they changed",
                        touched, root)
        return cls(root, manifest, max_open_maps=max_open_maps)

    # -- shape of the cache --------------------------------------------------------------

    @property
    def fields(self) -> dict[str, FieldSpec]:
        """The fields every shard of this store has (what a loader reads): name to dtype and per-sample shape.

        A field of a group (see ``shardstore.store.groups``) that some shards lack is left
        out; ``all_fields`` lists it, ``subset(manifest.positions_with([...]))`` makes it complete.
        """
        return self._complete

    @property
    def all_fields(self) -> dict[str, FieldSpec]:
        """Every field of the manifest, including group fields only some shards have."""
        return self.manifest.fields

    def select(self, fields: list[str] | tuple[str, ...]) -> ShardStore:
        """The same shards with only ``fields`` (a loader over it reads nothing else)."""
        missing = [name for name in fields if name not in self.manifest.fields]
        if missing:
            raise KeyError(f"no field {missing[0]!r}; the cache has {sorted(self.manifest.fields)}")
        manifest = Manifest(fields={n: self.manifest.fields[n] for n in fields},
                            shards=[ShardEntry(s.id, s.num_samples, s.layout, {n: f for n, f in s.files.items()
                                                                              if n in fields})
                                    for s in self.manifest.shards])
        return ShardStore(self.root, manifest, max_open_maps=self._maps.max_open)

    def with_dtype(self, field: str, dtype: np.dtype) -> ShardStore:
        """The same shards with ``field`` read as ``dtype`` of the same item size (its bytes unchanged).

        For values NumPy has no type for: bfloat16 saved by ml_dtypes is ``V2`` on disk, and is
        read as its uint16 bit patterns, which torch then views as bfloat16.
        """
        spec = self.manifest.fields[field]
        dtype = np.dtype(dtype)
        if dtype.itemsize != spec.dtype.itemsize:
            raise ValueError(f"{field!r} is {spec.dtype} ({spec.dtype.itemsize} bytes); {dtype} has {dtype.itemsize}")
        fields = {**self.manifest.fields, field: replace(spec, dtype=dtype)}
        manifest = Manifest(fields=fields, shards=self.manifest.shards, left_out=self.manifest.left_out)
        return ShardStore(self.root, manifest, max_open_maps=self._maps.max_open)

    @property
    def shards(self) -> list[ShardEntry]:
        """Shards in id order; a shard's *position* is its index in this list."""
        return self.manifest.shards

    @property
    def num_shards(self) -> int:
        return len(self.manifest.shards)

    @property
    def num_samples(self) -> int:
        return int(self.offsets[-1])

    def __len__(self) -> int:
        return self.num_samples

    @property
    def snapshot_id(self) -> str:
        """Id of the manifest's shard list; a sampler's saved state names the snapshot it was taken on."""
        return self.manifest.snapshot_id

    def subset(self, positions: list[int] | np.ndarray) -> ShardStore:
        """A store over the shards at ``positions`` only (kept in id order), e.g. to hold some out for evaluation."""
        keep = sorted({int(p) for p in positions})
        if not keep:
            raise ManifestError(f"an empty subset of the shards of {self.root} was asked for")
        if keep[0] < 0 or keep[-1] >= self.num_shards:
            raise IndexError(f"shard positions must be in [0, {self.num_shards}), got {keep[0]}..{keep[-1]}")
        manifest = Manifest(fields=self.manifest.fields, shards=[self.manifest.shards[p] for p in keep])
        return ShardStore(self.root, manifest, max_open_maps=self._maps.max_open)

    # -- reading -------------------------------------------------------------------------

    def path(self, position: int, field: str) -> Path:
        """The file of ``field`` in the shard at ``position``."""
        return self.root / self.manifest.shards[position].files[field].path

    def field(self, position: int, field: str) -> np.ndarray:
        """The whole ``field`` of the shard at ``position`` as a read-only memory-mapped array."""
        shard = self.manifest.shards[position]
        try:
            spec = self.manifest.fields[field]
        except KeyError:
            raise KeyError(f"no field {field!r}; the cache has {sorted(self.manifest.fields)}") from None
        entry = shard.files.get(field)
        if entry is None:
            raise KeyError(f"shard {shard.id} has no {field!r} (its group {spec.group!r} was not written for it); "
                           "fill it, or read the shards that have it: store.subset(manifest.positions_with([...]))")
        return self._maps.get(self.root / entry.path, spec.dtype, (shard.num_samples, *spec.shape), entry.data_offset)

    def shard(self, position: int) -> dict[str, np.ndarray]:
        """Every field of the shard at ``position``, memory-mapped."""
        return {name: self.field(position, name) for name in self.fields}

    def locate(self, sample_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(shard_position, row)`` of each global sample id (compiled kernel)."""
        return kernels.locate_rows(np.ascontiguousarray(sample_ids, dtype=np.int64), self.offsets)

    def read(self, position: int, field: str, rows: Any = slice(None)) -> np.ndarray:
        """A private copy of ``rows`` of ``field`` in the shard at ``position``.

        Unlike copying a view from :meth:`field` with NumPy, a file truncated while it is mapped
        is a ``CorruptShardError`` naming it, not a SIGBUS that kills the process.
        """
        try:
            return kernels.copy_from_map(self.field(position, field)[rows], field)
        except kernels.SourceFault:
            raise shrunk_error(self.path(position, field), self.shards[position].files[field].bytes) from None

    def position_of(self, sample_id: int) -> tuple[int, int]:
        """``(position, row)`` of one global sample id."""
        if not 0 <= sample_id < self.num_samples:
            raise IndexError(f"sample id {sample_id} is out of range [0, {self.num_samples})")
        position = int(np.searchsorted(self.offsets, sample_id, side="right")) - 1
        return position, sample_id - int(self.offsets[position])

    def sample(self, sample_id: int) -> dict[str, np.ndarray]:
        """One sample as zero-copy read-only views, by global id (copy with :meth:`read` to be safe from truncation)."""
        position, row = self.position_of(sample_id)
        return {name: self.field(position, name)[row] for name in self.fields}

    def __repr__(self) -> str:
        return f"ShardStore({str(self.root)!r}, shards={self.num_shards}, samples={self.num_samples})"
