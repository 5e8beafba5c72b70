"""PyTorch datasets over a cache: the whole manifest, and random shard-level epochs of it."""
