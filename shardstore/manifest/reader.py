"""``ShardStore`` now lives in ``shardstore.store.reader``; kept so that old imports keep working."""

from shardstore.store.reader import ShardStore, load_manifest  # noqa: F401
