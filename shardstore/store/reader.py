"""``ShardStore``: a cache opened through its manifest, each shard field a read-only memory map on demand."""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from shardstore import kernels
from shardstore.errors import ManifestError
from shardstore.store.manifest import FieldSpec, Manifest, ShardList
from shardstore.store.mmaps import MapCache, map_array, shrunk_error
from shardstore.store.npy import load_array
from shardstore.store.snapshot import TABLE_DIR, check_columns, manifest_path, read_manifest

if TYPE_CHECKING:
    from shardstore.store.remote import RemoteShards

log = logging.getLogger(__name__)

CHECKS = ("open", "all")


def load_manifest(root: str | os.PathLike[str], *, check: str = "open") -> Manifest:
    """Read and validate the manifest of the cache at ``root``; ``ManifestError`` with the fix when missing or bad."""
    return read_manifest(root, check=check)


class ShardStore:
    """Read access to a cache: global sample ids in shard-id order, fields as zero-copy read-only arrays.

    Opening costs O(1) Python objects whatever the shard count: per-shard facts stay in the
    manifest's columns (memory-mapped). Each file is checked against the manifest when it is
    first mapped, so a vanished, resized or linked-out file is a ``CorruptShardError`` naming
    it at the batch that needs it. Pickled into a DataLoader worker or a spawned rank, a store
    reopens its snapshot's table by path: the table is never copied.
    """

    def __init__(self, root: Path, manifest: Manifest, *, max_open_maps: int = 64,
                 remote: RemoteShards | None = None) -> None:
        self.root = Path(root)
        self.manifest = manifest
        #: the object store this cache's shards come from (None: a local cache); see ``shardstore.store.remote``
        self.remote = remote
        self._maps = MapCache(max_open_maps, on_drop=self._unpin if remote is not None else None)
        self._resolved_root = os.path.realpath(self.root)
        self._offsets: np.ndarray | None = None
        self._complete: dict[str, FieldSpec] | None = None
        # Files a remote cache downloads carry the time they arrived, not the bucket's: no warning for them.
        self._touched_warned = remote is not None

    @classmethod
    def open(cls, root: str | os.PathLike[str], *, max_open_maps: int = 64, check: str = "open",
             local_cache: str | os.PathLike[str] | None = None, cache_limit: int | str | None = None,
             storage_options: dict[str, Any] | None = None, prefetch_shards: int = 8) -> ShardStore:
        """Open the cache at ``root`` through its manifest.

        ``check="open"`` (the default) validates the manifest's header and its id and count
        columns; files are checked when first mapped. ``check="all"`` also validates every
        column and that every listed file exists, lies inside the root and has its recorded
        size (a ``ManifestError`` naming the first that does not), as ``shardstore verify`` does.

        ``root`` may be an object-store URL (``s3://bucket/prefix``, ``gs://``, ``az://``,
        ``file://``): its manifest is brought into ``local_cache`` (a node-local directory) and
        shards are fetched there as epochs need them, keeping it under ``cache_limit`` (bytes,
        or a string such as ``"50GB"``); ``storage_options`` go to the object-store client and
        ``prefetch_shards`` is how far ahead of the readers shards are fetched. See
        ``shardstore.store.remote``.
        """
        if check not in CHECKS:
            raise ValueError(f"check must be one of {CHECKS}, got {check!r}")
        remote = None
        if isinstance(root, str) and "://" in root:
            from shardstore.store.remote import open_remote

            root, remote = open_remote(root, local_cache=local_cache, cache_limit=cache_limit,
                                       storage_options=storage_options, prefetch_shards=prefetch_shards)
        root = Path(root)
        manifest = read_manifest(root, check=check)
        if manifest.num_shards == 0:
            raise ManifestError(f"{manifest_path(root)} lists no shards; write some and rebuild the manifest")
        if remote is not None:  # a map pins its shard in the local cache: keep a few shards' worth, not 64 maps
            max_open_maps = min(max_open_maps, max(4, 4 * len(manifest.fields)))
        store = cls(root, manifest, max_open_maps=max_open_maps, remote=remote)
        if remote is not None:
            remote.check_limit(manifest, list(store.fields))
        elif check == "all":
            store.check_files()
        return store

    @property
    def source(self) -> str:
        """Where the cache is: its object-store URL, or its local root."""
        return self.remote.url if self.remote is not None else str(self.root)

    def check_files(self) -> None:
        """Stat every listed file now: present, inside the root, of its recorded size; else ``ManifestError``."""
        from shardstore.store.layout import OutsideRootError, check_within

        m = self.manifest
        touched = 0
        for position in range(m.num_shards):
            for name in m.fields:
                if not m.columns[f"{name}.offset"][position]:
                    continue
                rel = m.file_path(position, name)
                path = self.root / rel
                try:
                    check_within(self._resolved_root, path, rel)
                    st = os.stat(path)
                except OutsideRootError as exc:
                    raise ManifestError(f"{manifest_path(self.root)} lists {exc}, then run "
                                        f"`shardstore build-manifest {self.root}`") from None
                except FileNotFoundError:
                    raise ManifestError(f"{path}: listed in the manifest but missing; "
                                        f"run `shardstore build-manifest {self.root}`") from None
                want = m.file_bytes(position, name)
                if st.st_size != want:
                    raise ManifestError(f"{path}: changed size since the manifest was built ({want:,} -> "
                                        f"{st.st_size:,} bytes); run `shardstore build-manifest {self.root}`")
                touched += st.st_mtime_ns != int(m.columns[f"{name}.mtime_ns"][position])
        if touched:
            log.warning("%d shard files in %s have a new mtime but the same size; rebuild the manifest if they "
                        "changed", touched, self.root)

    # -- pickling: the table is reopened by path, never copied ----------------------------

    def __getstate__(self) -> dict[str, Any]:
        m = self.manifest
        state = {"root": self.root, "max_open": self._maps.max_open, "fields": m.fields, "remote": self.remote}
        if m.source is not None:
            state["table"] = {"source": m.source, "columns": {n: (c.dtype.str, c.shape) for n, c in m.columns.items()},
                              "generation": m.generation, "snapshot_id": m.snapshot_id,
                              "format_version": m.format_version, "num_samples": m.num_samples}
        else:
            state["manifest"] = m
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        manifest = state.get("manifest")
        if manifest is None:
            manifest = _reopen_table(state["fields"], state["table"])
        self.__init__(state["root"], manifest, max_open_maps=state["max_open"], remote=state.get("remote"))

    # -- shape of the cache --------------------------------------------------------------

    @property
    def fields(self) -> dict[str, FieldSpec]:
        """The fields every shard of this store has (what a loader reads): name to dtype and per-sample shape.

        A field of a group (see ``shardstore.store.groups``) that some shards lack is left
        out; ``all_fields`` lists it, ``subset(manifest.positions_with([...]))`` makes it complete.
        """
        if self._complete is None:
            self._complete = self.manifest.complete_fields()
        return self._complete

    @property
    def all_fields(self) -> dict[str, FieldSpec]:
        """Every field of the manifest, including group fields only some shards have."""
        return self.manifest.fields

    def _derived(self, manifest: Manifest) -> ShardStore:
        return ShardStore(self.root, manifest, max_open_maps=self._maps.max_open, remote=self.remote)

    def select(self, fields: list[str] | tuple[str, ...]) -> ShardStore:
        """The same shards with only ``fields`` (a loader over it reads nothing else)."""
        missing = [name for name in fields if name not in self.manifest.fields]
        if missing:
            raise KeyError(f"no field {missing[0]!r}; the cache has {sorted(self.manifest.fields)}")
        return self._derived(self.manifest.with_fields({n: self.manifest.fields[n] for n in fields}))

    def with_dtype(self, field: str, dtype: np.dtype) -> ShardStore:
        """The same shards with ``field`` read as ``dtype`` of the same item size (its bytes unchanged).

        For values NumPy has no type for: bfloat16 saved by ml_dtypes is ``V2`` on disk, and is
        read as its uint16 bit patterns, which torch then views as bfloat16.
        """
        spec = self.manifest.fields[field]
        dtype = np.dtype(dtype)
        if dtype.itemsize != spec.dtype.itemsize:
            raise ValueError(f"{field!r} is {spec.dtype} ({spec.dtype.itemsize} bytes); {dtype} has {dtype.itemsize}")
        return self._derived(self.manifest.with_fields({**self.manifest.fields, field: replace(spec, dtype=dtype)}))

    @property
    def shards(self) -> ShardList:
        """Shards in id order as ``ShardEntry`` views (built on access); a shard's *position* is its index."""
        return self.manifest.shards

    @property
    def shard_ids(self) -> np.ndarray:
        """Shard ids by position (int64)."""
        return self.manifest.ids

    @property
    def counts(self) -> np.ndarray:
        """Samples of each shard by position (int64)."""
        return self.manifest.counts

    @property
    def offsets(self) -> np.ndarray:
        """``offsets[p]`` is the global id of shard position ``p``'s first sample; ``offsets[-1]`` the total."""
        if self._offsets is None:
            offsets = np.empty(self.num_shards + 1, np.int64)
            offsets[0] = 0
            np.cumsum(self.counts, out=offsets[1:])
            self._offsets = offsets
        return self._offsets

    @property
    def num_shards(self) -> int:
        return self.manifest.num_shards

    @property
    def num_samples(self) -> int:
        return self.manifest.num_samples

    def __len__(self) -> int:
        return self.num_samples

    @property
    def snapshot_id(self) -> str:
        """Id of the manifest's shard table; a sampler's saved state names the snapshot it was taken on."""
        return self.manifest.snapshot_id

    def subset(self, positions: list[int] | np.ndarray) -> ShardStore:
        """A store over the shards at ``positions`` only (kept in id order), e.g. to hold some out for evaluation."""
        keep = np.unique(np.asarray(positions, dtype=np.int64))
        if not keep.size:
            raise ManifestError(f"an empty subset of the shards of {self.root} was asked for")
        if keep[0] < 0 or keep[-1] >= self.num_shards:
            raise IndexError(f"shard positions must be in [0, {self.num_shards}), got {keep[0]}..{keep[-1]}")
        if keep.size == self.num_shards:
            return self._derived(self.manifest)
        return self._derived(self.manifest.take(keep))

    # -- a cache that grows ---------------------------------------------------------------

    @property
    def generation(self) -> int:
        """The manifest generation this store was opened on (one more at every written build)."""
        return self.manifest.generation

    def refreshed(self, *, exclude_ids: np.ndarray | None = None, generation: int | None = None) -> ShardStore:
        """This store over the cache's manifest as it is now: the shards it has, and those added since.

        The new snapshot is read with this store's fields (and dtypes); a shard joins when it
        has every one of them, its id is not in ``exclude_ids`` (e.g. the shards a run holds
        out for evaluation) and, with ``generation``, it was listed by that generation already
        (``since <= generation``: the snapshot an epoch was planned on). Shards are only ever
        added: one this store has that the manifest lost, or whose sample count changed, is a
        ``ManifestError`` naming it. Returns ``self`` when the manifest is unchanged. Cheap
        with a format-3 manifest: a header, a mapped table and a few vectorized passes.
        """
        if self.remote is not None and self.remote.is_owner:
            from shardstore.store.remote import fetch_manifest

            fetch_manifest(self.remote.client, self.root)
        manifest = read_manifest(self.root)
        if manifest.source is not None and manifest.source == self.manifest.source and generation in (
                None, manifest.generation):
            return self
        if generation is not None and manifest.generation < generation:
            raise ManifestError(f"{manifest_path(self.root)} is at generation {manifest.generation}, but generation "
                                f"{generation} was asked for (another rank or process saw a newer manifest): the file "
                                "system has not shown this process the new manifest yet")
        fields = self.manifest.fields
        for name, spec in fields.items():
            new = manifest.fields.get(name)
            if new is None or new.shape != spec.shape or new.dtype.itemsize != spec.dtype.itemsize:
                raise ManifestError(f"{manifest_path(self.root)}: field {name!r} is now "
                                    f"{new.describe() if new else 'gone'}, it was {spec.describe()} when this run "
                                    "started; a cache that grows may only gain shards")
        view = manifest.with_fields(fields)
        mask = np.ones(view.num_shards, bool)
        for name in self.fields:
            mask &= view.has(name)
        if exclude_ids is not None and len(exclude_ids):
            mask &= ~np.isin(view.ids, np.asarray(exclude_ids, np.int64))
        if generation is not None:
            mask &= np.asarray(view.columns["since"]) <= generation
        keep = np.flatnonzero(mask)
        new_ids = np.asarray(view.ids)[keep]
        old_ids = np.asarray(self.shard_ids)
        old_counts = np.asarray(self.counts)
        if generation is not None:  # this store may already list shards added after ``generation``
            older = np.asarray(self.manifest.columns["since"]) <= generation
            old_ids, old_counts = old_ids[older], old_counts[older]
        at = np.searchsorted(new_ids, old_ids)
        found = (at < new_ids.size) & (new_ids[np.minimum(at, max(new_ids.size - 1, 0))] == old_ids) if new_ids.size \
            else np.zeros(old_ids.size, bool)
        if not found.all():
            lost = old_ids[~found]
            shown = ", ".join(map(str, lost[:8].tolist())) + (" ..." if lost.size > 8 else "")
            raise ManifestError(f"{manifest_path(self.root)}: {lost.size} shard(s) this run reads are no longer in the "
                                f"manifest (ids {shown}); a cache that grows while training may only gain shards: "
                                "restore them and run `shardstore build-manifest` again")
        new_counts = np.asarray(view.counts)[keep[at]]
        if not np.array_equal(old_counts, new_counts):
            i = int(np.flatnonzero(old_counts != new_counts)[0])
            raise ManifestError(f"{manifest_path(self.root)}: shard {int(old_ids[i])} now has {int(new_counts[i]):,} "
                                f"samples, it had {int(old_counts[i]):,}; shards of a growing cache may not change")
        result = view if keep.size == view.num_shards else view.take(keep)
        if generation is not None:
            result.generation = generation  # the snapshot it stands for: the shards listed by then
        return self._derived(result)

    # -- reading -------------------------------------------------------------------------

    def relative_path(self, position: int, field: str) -> str:
        """The file of ``field`` in the shard at ``position``, relative to the root."""
        return self.manifest.file_path(position, field)

    def path(self, position: int, field: str) -> Path:
        """The file of ``field`` in the shard at ``position``."""
        return self.root / self.manifest.file_path(position, field)

    def field(self, position: int, field: str) -> np.ndarray:
        """The whole ``field`` of the shard at ``position`` as a read-only memory-mapped array.

        The file is checked when first mapped (present, inside the root, of the size the
        manifest records); a ``CorruptShardError`` names it otherwise.
        """
        m = self.manifest
        try:
            spec = m.fields[field]
        except KeyError:
            raise KeyError(f"no field {field!r}; the cache has {sorted(m.fields)}") from None
        if not 0 <= position < m.num_shards:
            raise IndexError(f"shard position {position} is out of range [0, {m.num_shards})")
        offset = int(m.columns[f"{field}.offset"][position])
        if offset == 0 and spec.group is None:
            raise ManifestError(f"{manifest_path(self.root)}: shard {int(m.ids[position])} has no {field!r} file in "
                                "the table, a field every shard has (the table is damaged); rebuild it with "
                                f"`shardstore build-manifest {self.root}`")
        if offset == 0:
            raise KeyError(f"shard {int(m.ids[position])} has no {field!r} (its group {spec.group!r} was not written "
                           "for it); fill it, or read the shards that have it: "
                           "store.subset(manifest.positions_with([...]))")
        rel = m.file_path(position, field)
        path = self.root / rel
        return self._maps.get(path, lambda: self._map(position, field, spec, rel, path, offset),
                              tag=int(m.ids[position]) if self.remote is not None else None)

    def fetch(self, position: int) -> float:
        """Make the shard at ``position`` local before it is read (remote caches; a no-op for local ones).

        Returns the seconds waited for it. Readers that open files themselves call this first.
        """
        if self.remote is None:
            return 0.0
        return self.remote.ensure(self.manifest, position, tuple(self.manifest.fields))

    def release(self, position: int) -> None:
        """Drop this store's maps of the shard at ``position`` (a reader is done with it); arrays handed out stay valid.

        For a remote cache this unpins the shard, so the local cache may evict it.
        """
        m = self.manifest
        for name in m.fields:
            if int(m.columns[f"{name}.offset"][position]):
                self._maps.discard(self.root / m.file_path(position, name))

    def _unpin(self, shard_id: int) -> None:
        if self.remote is not None:
            from shardstore.store.remote import shard_name

            self.remote.cache.unpin(shard_name(shard_id))

    def _map(self, position: int, field: str, spec: FieldSpec, rel: str, path: Path, offset: int) -> np.ndarray:
        m = self.manifest
        if self.remote is not None:  # fetched if need be, and pinned while the map is in the cache
            self.remote.ensure(m, position, tuple(m.fields), pin=True)
        try:
            array, st = map_array(path, spec.dtype, (int(m.counts[position]), *spec.shape), offset,
                                  resolved_root=self._resolved_root, rel=rel,
                                  expected_bytes=m.file_bytes(position, field))
        except BaseException:
            if self.remote is not None:
                self.remote.unpin(m, position)
            raise
        if st.st_mtime_ns != int(m.columns[f"{field}.mtime_ns"][position]) and not self._touched_warned:
            self._touched_warned = True
            log.warning("%s has a new mtime but the size the manifest records; rebuild the manifest if shard "
                        "files changed (`shardstore build-manifest %s`)", path, self.root)
        return array

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
            raise shrunk_error(self.path(position, field), self.manifest.file_bytes(position, field)) from None

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
        return f"ShardStore({self.source!r}, shards={self.num_shards}, samples={self.num_samples})"


def _reopen_table(fields: dict[str, FieldSpec], table: dict[str, Any]) -> Manifest:
    """The manifest of a pickled store: its snapshot's columns mapped again from disk (never sent whole)."""
    root, name = table["source"]
    directory = Path(root) / TABLE_DIR / name
    columns = {}
    for column, (dtype, shape) in table["columns"].items():
        path = directory / f"{column}.npy"
        try:
            array = load_array(path, mmap=bool(shape[0]))
        except FileNotFoundError:
            raise ManifestError(f"{directory}: the manifest snapshot this store was opened on has been replaced "
                                "twice since; open the store again") from None
        if array.dtype.str != dtype or array.shape != tuple(shape):
            raise ManifestError(f"{path}: no longer the table this store was opened on; open the store again")
        columns[column] = array
    manifest = Manifest(fields, columns=columns, generation=table["generation"], snapshot_id=table["snapshot_id"],
                        source=tuple(table["source"]))
    manifest.format_version = table["format_version"]
    manifest._num_samples = table["num_samples"]
    return manifest


__all__ = ["ShardStore", "load_manifest", "check_columns"]
