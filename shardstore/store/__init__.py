"""The on-disk layout, the crash-safe shard writer, and read-only memory maps of shard files."""
