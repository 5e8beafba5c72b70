"""Discovering and validating shards, the manifest file, and opening a cache through it."""
