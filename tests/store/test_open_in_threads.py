"""Stores opened from many threads at once: NumPy parses ``.npy`` headers with ``ast.literal_eval``, and CPython
3.11's AST construction races between threads ("SystemError: AST constructor recursion depth mismatch")."""

from __future__ import annotations

from pathlib import Path

import pytest

from shardstore import ShardStore, build_manifest
from tests.conftest import errors_in_threads, write_native


@pytest.mark.slow
def test_eight_threads_open_stores_at_once_without_error(tmp_path: Path) -> None:
    root = write_native(tmp_path / "cache", 40, 4)
    build_manifest(root)
    for round_ in range(20):
        def open_both(n: int, round_: int = round_) -> None:
            # Through a local cache too: its open copies the manifest table and maps it, in every thread.
            remote = ShardStore.open(f"file://{root}", local_cache=tmp_path / f"node{round_}-{n % 2}",
                                     cache_limit="64MB")
            assert ShardStore.open(root).num_samples == remote.num_samples == 40

        assert errors_in_threads(open_both) == []
