"""``World``: this process's rank and the number of ranks, passed to sampling apart from any config."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class World:
    """One rank of ``world_size`` data-parallel ranks."""

    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.world_size, int) or self.world_size < 1:
            raise ValueError(f"world_size must be a positive integer, got {self.world_size!r}")
        if not isinstance(self.rank, int) or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be an integer in [0, {self.world_size}), got {self.rank!r}")
