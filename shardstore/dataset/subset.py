"""``RandomShardSubsetCachedDataset``: each epoch a seeded subset of whole shards, read in order, split over ranks."""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from shardstore.config.data import DataConfig, load_data_config
from shardstore.dataset.cached import CachedTensorDataset
from shardstore.errors import ConfigError, ShardstoreError
from shardstore.sampling.plan import EpochPlan, EpochSpec, RankPlan, plan_epoch, rank_plan, steps_per_epoch
from shardstore.sampling.shards import PERMUTATION_SCHEDULE
from shardstore.sampling.state import SamplerState
from shardstore.sampling.world import World
from shardstore.store.reader import ShardStore


def open_data_store(config: DataConfig) -> ShardStore:
    """The store ``data_config.yaml`` names: a local cache, or one in object storage read through ``local_cache``."""
    return ShardStore.open(config.cache_root, local_cache=config.local_cache, cache_limit=config.cache_limit,
                           storage_options=config.storage_options)


def resolve_world(rank: int | None, world_size: int | None) -> World:
    """Explicit ``rank``/``world_size``, else torch.distributed's when it is initialized, else a single rank."""
    if rank is not None or world_size is not None:
        if rank is None or world_size is None:
            raise ValueError("give both rank and world_size, or neither (to use torch.distributed)")
        return World(rank, world_size)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return World(torch.distributed.get_rank(), torch.distributed.get_world_size())
    return World()


#: the arguments' former names (before each took its ``data_config.yaml`` key's name)
FORMER_ARGUMENTS = {"seed": "random_subset_seed", "policy": "shard_policy", "order": "sample_order"}


def _former_spellings(given: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """Map deprecated keyword arguments to their current names, warning once per call; unknown ones are a TypeError."""
    renamed = {}
    for old, value in given.items():
        new = FORMER_ARGUMENTS.get(old)
        if new is None:
            raise TypeError(f"RandomShardSubsetCachedDataset() got an unexpected keyword argument {old!r}")
        if settings[new] != EpochSpec.__dataclass_fields__[new].default and settings[new] != value:
            raise TypeError(f"RandomShardSubsetCachedDataset() got {new}={settings[new]!r} and its former spelling "
                            f"{old}={value!r}; pass {new} alone")
        warnings.warn(f"RandomShardSubsetCachedDataset({old}=...) is deprecated; use {new}=..., the name of the "
                      "data_config.yaml key", DeprecationWarning, stacklevel=3)
        renamed[new] = value
    return renamed


class RandomShardSubsetCachedDataset(Dataset):
    """Map-style dataset whose item ``i`` is this rank's ``i``-th sample of the current epoch.

    ``set_epoch(e)`` draws the epoch's shards from ``(random_subset_seed, e)`` alone. The epoch's global
    read order does not depend on the world size: global batch ``b`` (``world_size *
    batch_size`` samples) is split so each rank reads a contiguous run of it, and every rank
    gets ``min(samples // global_batch, max_steps_per_epoch)`` batches — the remainder of the
    epoch (fewer than one global batch) is dropped, so no rank waits on another.

    Use it with a sequential sampler (``DataLoader(ds, batch_size=batch_size)``; no
    ``shuffle``): the order is the dataset's. The epoch lives in shared memory, so
    ``set_epoch`` reaches ``DataLoader`` workers, persistent ones included.
    """

    def __init__(
        self,
        base: CachedTensorDataset | ShardStore,
        shards_per_epoch: int | None = 15,
        random_subset_seed: int = 42,
        shard_policy: str = "random",
        *,
        sample_order: str = "sequential",
        active_shards: int = 4,
        batch_size: int = 64,
        max_steps_per_epoch: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        refresh_manifest: bool = False,
        held_out_ids: np.ndarray | list[int] | None = None,
        **former: Any,
    ) -> None:
        # Deprecated spellings (``seed``, ``policy``, ``order``) still work, with a warning.
        settings = {"random_subset_seed": random_subset_seed, "shard_policy": shard_policy,
                    "sample_order": sample_order}
        settings.update(_former_spellings(former, settings))
        self.base = base if isinstance(base, CachedTensorDataset) else CachedTensorDataset(base)
        self.store = self.base.store
        #: re-read the manifest at every ``set_epoch``: shards added to the cache join from that epoch on
        self.refresh_manifest = bool(refresh_manifest)
        #: shard ids that never join (a run's evaluation shards), whatever the manifest lists
        self.held_out_ids = np.unique(np.asarray(held_out_ids if held_out_ids is not None else [], dtype=np.int64))
        #: bumped whenever ``store`` is replaced: a loader's job planned on another store is not reused
        self.store_version = 0
        try:
            self.spec = EpochSpec(shards_per_epoch=shards_per_epoch, active_shards=active_shards, **settings)
            if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
                raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
            if max_steps_per_epoch is not None and (not isinstance(max_steps_per_epoch, int)
                                                    or max_steps_per_epoch < 1):
                raise ValueError(f"max_steps_per_epoch must be a positive integer or None, got {max_steps_per_epoch!r}")
            self.world = resolve_world(rank, world_size)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.batch_size = batch_size
        self.max_steps_per_epoch = max_steps_per_epoch
        # (epoch, start_batch) in shared memory: DataLoader workers read it at every item,
        # so a set_epoch in the main process reaches persistent workers too.
        self._shared = torch.zeros(3, dtype=torch.int64).share_memory_()  # epoch, start_batch, manifest generation
        self._cell = self._shared.numpy()  # a NumPy view of it: cheap to read on every item
        self._key: tuple[int, int] | None = None
        self._plan: EpochPlan | None = None
        self._rank_plan: RankPlan | None = None
        self._plan_id: tuple[ShardStore, str] | None = None
        self._cell[2] = self.store.generation
        self._cell[0] = self._cell[1] = 0

    @classmethod
    def from_data_config(cls, config: DataConfig | str | os.PathLike[str],
                         **kwargs: Any) -> RandomShardSubsetCachedDataset:
        """Build from ``data_config.yaml`` (a path or a loaded ``DataConfig``); ``kwargs`` as for the constructor."""
        if not isinstance(config, DataConfig):
            config = load_data_config(config)
        store = open_data_store(config)
        kwargs.setdefault("refresh_manifest", config.refresh_manifest)
        return cls(store, **config.epoch_settings(), **kwargs)

    # -- epochs ----------------------------------------------------------------------------

    @property
    def global_batch(self) -> int:
        """Samples per step over all ranks."""
        return self.world.world_size * self.batch_size

    @property
    def epoch(self) -> int:
        return int(self._cell[0])

    def set_epoch(self, epoch: int, *, start_batch: int = 0, generation: int | None = None) -> list[int]:
        """Make ``epoch`` current, from global batch ``start_batch`` (0 unless resuming); return its shard ids.

        With ``refresh_manifest`` a new epoch (``start_batch`` 0) first re-reads the manifest:
        shards added since join from this epoch on, and the epoch's plan is a function of the
        seed, the epoch and that snapshot (its generation is in ``state_dict()``). Ranks of one
        run must plan on the same snapshot: pass the ``generation`` rank 0 saw (a rank that sees
        an older manifest is an error, never a silently different epoch).
        """
        for name, value in (("epoch", epoch), ("start_batch", start_batch)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise ShardstoreError(f"{name} must be a non-negative integer, got {value!r}")
        if self.refresh_manifest and start_batch == 0:
            self.use_store(self.store.refreshed(exclude_ids=self.held_out_ids, generation=generation))
        self._cell[0] = epoch
        self._cell[1] = start_batch
        shards = self.selected_shards
        if self.store.remote is not None:
            self._fetch_ahead()
        return shards

    # -- a cache in object storage ----------------------------------------------------------

    def _fetch_ahead(self) -> None:
        """Tell the store's prefetcher this epoch's shards (in visit order) and how far off each one's next use is."""
        assert self._plan is not None
        remote, store = self.store.remote, self.store
        fields = tuple(store.manifest.fields)
        remote.plan(store.manifest, self._plan.shard_positions, fields)
        remote.next_use = self._next_use
        try:  # the next epoch's first shards are fetched while this one drains (a refresh may add shards to it)
            following = plan_epoch(store.counts, store.offsets, self.spec, self.epoch + 1)
        except ValueError:
            return
        remote.plan_next(store.manifest, following.shard_positions, fields)

    #: how many epochs ahead eviction looks for a shard's next use (beyond: never needed again)
    NEXT_USE_HORIZON = 32

    def _next_use(self, name: str) -> float:
        """Epochs until the shard named ``name`` is next read (0: this epoch; inf: not within the horizon).

        The whole schedule is a function of the seed and the epoch, so the local cache evicts the
        shard needed farthest ahead.
        """
        from shardstore.store.remote import shard_id_of

        key = (self.epoch, self.store_version)
        table = getattr(self, "_next_uses", None)
        if table is None or table[0] != key:
            uses: dict[int, int] = {}
            store = self.store
            for ahead in range(self.NEXT_USE_HORIZON, -1, -1):
                try:
                    plan = plan_epoch(store.counts, store.offsets, self.spec, self.epoch + ahead)
                except ValueError:
                    continue
                for p in plan.shard_positions.tolist():
                    uses[int(store.shard_ids[p])] = ahead
            table = self._next_uses = (key, uses)
        return float(table[1].get(shard_id_of(name), float("inf")))

    def use_store(self, store: ShardStore) -> None:
        """Read from ``store`` from the next epoch planned on (a refreshed snapshot of the same cache)."""
        if store is self.store:
            return
        self.store = store
        self.base = CachedTensorDataset(store)
        self.store_version += 1
        self._cell[2] = store.generation

    def _follow_main_process(self) -> None:
        """In a DataLoader worker: take the snapshot the main process moved to (its generation is shared)."""
        wanted = int(self._cell[2])
        if self.refresh_manifest and wanted != self.store.generation:
            self.store = self.store.refreshed(exclude_ids=self.held_out_ids, generation=wanted)
            self.base = CachedTensorDataset(self.store)

    def __getstate__(self) -> dict[str, Any]:
        # A spawned worker gets the shared tensor by handle; a pickled NumPy view would be a private copy.
        state = self.__dict__.copy()
        del state["_cell"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._cell = self._shared.numpy()

    @property
    def start_batch(self) -> int:
        """Global batch the current epoch (re)started from: 0, or the resume point."""
        return int(self._cell[1])

    def _plans(self, epoch: int, start_batch: int) -> tuple[EpochPlan, RankPlan]:
        store = self.store
        counts = store.counts  # the manifest's column: nothing per shard is computed or copied
        try:
            plan = plan_epoch(counts, store.offsets, self.spec, epoch)
        except ValueError as exc:
            raise ShardstoreError(str(exc)) from None
        if plan.num_samples < self.global_batch:
            raise self._too_small(plan)
        try:
            return plan, rank_plan(plan, store, self.world, self.batch_size, self.max_steps_per_epoch, start_batch)
        except ValueError as exc:
            raise ShardstoreError(str(exc)) from None

    def _resume_store(self, saved: SamplerState) -> None:
        """Use the snapshot the saved epoch was planned on: this store, or (refreshing) its generation's shards."""
        if not saved.plan_id:  # a state from before plan ids: the manifest must be the very same
            if saved.snapshot_id != self.store.snapshot_id:
                raise ConfigError(f"the saved sampler state was taken on manifest snapshot {saved.snapshot_id}, this "
                                  f"cache is {self.store.snapshot_id}; the epoch order would differ. Resume on the "
                                  "same manifest")
            return
        if saved.plan_id == self.plan_id:
            return
        if self.refresh_manifest:
            then = self.store.refreshed(exclude_ids=self.held_out_ids, generation=saved.generation)
            if then.manifest.plan_id() == saved.plan_id:
                self.use_store(then)
                return
        raise ConfigError(
            f"the saved sampler state was planned on other shards (manifest generation {saved.generation}, shard "
            f"list {saved.plan_id}; this cache's is {self.plan_id}), so its epoch order would differ; resume on the "
            "same manifest" + ("" if self.refresh_manifest else
                               ", or with refresh_manifest if the cache only gained shards since"))

    def _too_small(self, plan: EpochPlan) -> ConfigError:
        """An epoch with fewer samples than one global batch would have 0 steps: an error, not a silent no-op."""
        per_step = f"batch_size {self.batch_size}"
        if self.world.world_size > 1:
            per_step += f" x world_size {self.world.world_size} = {self.global_batch} samples"
        return ConfigError(
            f"{per_step} per step is more than the {plan.num_samples:,} samples of epoch {plan.epoch} "
            f"({plan.shard_positions.size} shards of {self.store.root}), so the epoch would have 0 steps; "
            "lower batch_size, or raise shards_per_epoch (or write more shards)"
        )

    def rank_plan(self, epoch: int, start_batch: int = 0) -> RankPlan:
        """What this rank reads of ``epoch`` from global batch ``start_batch``, without making it current.

        Pure data from the seed, the epoch and the store (no state changes), so a loader's
        planning thread calls it to prepare the next epoch before ``set_epoch``; the plan names
        the store it indexes (``plan.store``), which is what to read through.
        """
        return self._plans(epoch, start_batch)[1]

    def epoch_indices(self, epoch: int, start_batch: int = 0) -> np.ndarray:
        """This rank's global sample ids of ``epoch`` from global batch ``start_batch``, without making it current."""
        return self.rank_plan(epoch, start_batch).sample_ids

    def _sync(self) -> RankPlan:
        self._follow_main_process()
        key = (int(self._cell[0]), int(self._cell[1]))
        if key != self._key or self._rank_plan is None or self._rank_plan.store is not self.store:
            self._plan, self._rank_plan = self._plans(*key)
            self._key = key
        return self._rank_plan

    @property
    def selected_shards(self) -> list[int]:
        """Ids of this epoch's shards, in visit order."""
        store = self._sync().store
        assert self._plan is not None
        return [int(store.shard_ids[p]) for p in self._plan.shard_positions]

    @property
    def steps_per_epoch(self) -> int:
        """Batches each rank takes in a full epoch (whole global batches, capped)."""
        self._sync()
        assert self._plan is not None
        return steps_per_epoch(self._plan.num_samples, self.world.world_size, self.batch_size,
                               self.max_steps_per_epoch)

    def indices(self) -> np.ndarray:
        """This rank's global sample ids for the rest of the epoch (read-only)."""
        return self._sync().sample_ids

    def __len__(self) -> int:
        return self._sync().num_samples

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.base[int(self._sync().sample_ids[i])]

    # -- resume ----------------------------------------------------------------------------

    def state_dict(self, steps_done: int = 0) -> dict[str, Any]:
        """State after this rank took ``steps_done`` batches of the current epoch since it (re)started.

        Every rank takes the same steps, so the global position is the same on all of them.
        """
        start_batch = self.start_batch
        if not 0 <= steps_done <= self.steps_per_epoch - start_batch:
            raise ValueError(f"steps_done must be in [0, {self.steps_per_epoch - start_batch}], got {steps_done}")
        return SamplerState(
            epoch=self.epoch,
            samples_consumed=(start_batch + steps_done) * self.global_batch,
            global_batch=self.global_batch,
            random_subset_seed=self.spec.random_subset_seed,
            shards_per_epoch=self.spec.shards_per_epoch,
            shard_policy=self.spec.shard_policy,
            sample_order=self.spec.sample_order,
            active_shards=self.spec.active_shards,
            snapshot_id=self.store.snapshot_id,
            plan_id=self.plan_id,
            generation=self.store.generation,
            schedule=PERMUTATION_SCHEDULE,
        ).to_dict()

    @property
    def plan_id(self) -> str:
        """Hash of what the current store gives an epoch plan: its shard ids and sample counts."""
        if self._plan_id is None or self._plan_id[0] is not self.store:
            self._plan_id = (self.store, self.store.manifest.plan_id())
        return self._plan_id[1]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where ``state`` was taken: the same epoch, from the next global batch, in O(1).

        The world size may differ from the run that saved it, as long as the global batch
        (``world_size * batch_size``) is the same.
        """
        saved = SamplerState.from_dict(state)
        mine = {"random_subset_seed": self.spec.random_subset_seed, "shards_per_epoch": self.spec.shards_per_epoch,
                "shard_policy": self.spec.shard_policy, "sample_order": self.spec.sample_order,
                "active_shards": self.spec.active_shards, "global_batch": self.global_batch}
        for key, value in mine.items():
            if getattr(saved, key) != value:
                raise ConfigError(
                    f"the saved sampler state has {key}={getattr(saved, key)!r} but this dataset has {value!r}; "
                    "resume with the same settings (global batch = world_size x batch_size)"
                )
        if saved.shard_policy == "permutation" and saved.schedule != PERMUTATION_SCHEDULE:
            raise ConfigError(f"the saved sampler state walks the permutation schedule {saved.schedule}, this "
                              f"version walks schedule {PERMUTATION_SCHEDULE}; its epoch cannot be continued: resume "
                              "from an end-of-epoch checkpoint")
        self._resume_store(saved)
        if saved.samples_consumed % saved.global_batch:
            raise ConfigError(f"samples_consumed {saved.samples_consumed} is not a whole number of global batches")
        self.set_epoch(saved.epoch, start_batch=saved.samples_consumed // saved.global_batch)
