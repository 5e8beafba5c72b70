"""The sampler's resumable state: a few numbers, never per-sample lists."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

#: field names of states saved before each field took its ``data_config.yaml`` key's name
_FORMER_NAMES = {"seed": "random_subset_seed", "order": "sample_order"}


@dataclass(frozen=True)
class SamplerState:
    """Where a run is: the epoch, how many samples all ranks consumed in it, and what defines its order."""

    epoch: int
    samples_consumed: int  # global, over all ranks; a multiple of the global batch
    global_batch: int  # world_size * batch_size when the state was taken
    random_subset_seed: int
    shards_per_epoch: int | None
    shard_policy: str
    sample_order: str
    active_shards: int
    snapshot_id: str  # the manifest snapshot the epoch was planned on (for messages)
    #: what the epoch's order depends on besides the settings: its shards' ids and sample counts, hashed
    plan_id: str = ""
    #: the manifest generation of that snapshot: with ``refresh_manifest``, its shards are those with ``since <= it``
    generation: int = 0
    #: version of the ``permutation`` policy's schedule (``shardstore.sampling.shards.PERMUTATION_SCHEDULE``)
    schedule: int = 1

    def to_dict(self) -> dict[str, Any]:
        """Plain values for a checkpoint (``torch.save`` with ``weights_only=True`` can load them)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> SamplerState:
        """Validate and rebuild a state saved with ``to_dict`` (by this version or one that named fields otherwise)."""
        if not isinstance(state, dict):
            raise ValueError(f"not a sampler state (a {type(state).__name__}); pass what state_dict() returned")
        state = {_FORMER_NAMES.get(key, key): value for key, value in state.items()}
        try:
            return cls(**state)  # a state saved before plan_id existed gets "": its epoch cannot be continued
        except TypeError as exc:
            raise ValueError(f"not a sampler state ({exc}); pass what state_dict() returned") from None
