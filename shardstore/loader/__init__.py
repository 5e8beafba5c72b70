"""Batches from the shard maps into reused (pinned) buffers on background threads; async copies to the GPU."""

from shardstore.loader.pipeline import LoaderRestarted
from shardstore.loader.shard_loader import ShardLoader
from shardstore.loader.stats import WaitStats

__all__ = ["LoaderRestarted", "ShardLoader", "WaitStats"]
