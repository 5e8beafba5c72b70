"""Compiled kernels of shardstore; use them through ``shardstore.kernels``."""
