"""The sampler's resumable state: a few numbers, never per-sample lists."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class SamplerState:
    """Where a run is: the epoch, how many samples all ranks consumed in it, and what defines its order."""

    epoch: int
    samples_consumed: int  # global, over all ranks; a multiple of the global batch
    global_batch: int  # world_size * batch_size when the state was taken
    seed: int
    shards_per_epoch: int | None
    shard_policy: str
    order: str
    active_shards: int
    snapshot_id: str  # the manifest's shard list; another one would give another order

    def to_dict(self) -> dict[str, Any]:
        """Plain values for a checkpoint (``torch.save`` with ``weights_only=True`` can load them)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> SamplerState:
        """Validate and rebuild a state saved with ``to_dict``."""
        try:
            return cls(**state)
        except TypeError as exc:
            raise ValueError(f"not a sampler state ({exc}); pass what state_dict() returned") from None
