"""``cache_shard_size`` checked against the manifest: a setting that disagrees with the cache is refused, not ignored.

Training never needs the setting (every shard's sample count is in the manifest, and a writer's last
shard may be short), so its one use is as a statement about the cache: a user who ported a config
saying 2048 to a cache written with 1000 per shard has epochs half the size they planned
(``shards_per_epoch`` x 1000 samples). Saying so before the first step is the point.
"""

from __future__ import annotations

import numpy as np

from shardstore.errors import ConfigError
from shardstore.store.reader import ShardStore


def manifest_shard_size(samples_per_shard: np.ndarray) -> int:
    """The shard size a cache was written with: its largest shard's sample count (0 for no shard).

    Every shard but a writer's last holds exactly the shard size, so the largest is it, whichever
    shards are short.
    """
    return int(np.max(samples_per_shard)) if len(samples_per_shard) else 0


def check_cache_shard_size(store: ShardStore, cache_shard_size: int | None, *, source: str = "data_config") -> None:
    """``ConfigError`` unless ``cache_shard_size`` (None: not checked) is the shard size of ``store``'s manifest.

    A cache of one short shard passes with a larger setting: that shard is its writer's last.
    """
    if cache_shard_size is None or store.num_shards == 0:
        return
    samples_per_shard = np.diff(store.offsets)
    actual = manifest_shard_size(samples_per_shard)
    if actual == cache_shard_size or (store.num_shards == 1 and actual < cache_shard_size):
        return
    short = int(np.count_nonzero(samples_per_shard < actual))
    shape = f"{store.num_shards:,} shards of {actual:,} samples" + (f" ({short:,} shorter)" if short else "")
    raise ConfigError(f"{source}: `cache_shard_size` is {cache_shard_size:,}, but the manifest of {store.root} "
                      f"says {shape}; set cache_shard_size: {actual} (or null to take it from the manifest)")
