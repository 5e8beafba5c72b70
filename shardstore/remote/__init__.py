"""Shards in object storage: URLs, object clients with retries, and the node-local shard cache.

This layer sits below ``store``: it knows objects, byte ranges, local files and locks, never the manifest's
data model. ``store`` opens a URL root through it; the node-local cache turns remote shard files into local
files that the ordinary reader maps.
"""
