"""Stores opened from many threads at once: NumPy parses ``.npy`` headers with ``ast.literal_eval``, and CPython
3.11's AST construction races between threads ("SystemError: AST constructor recursion depth mismatch")."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from shardstore import ShardStore, build_manifest
from tests.conftest import write_native


@pytest.mark.slow
def test_eight_threads_open_stores_at_once_without_error(tmp_path: Path) -> None:
    root = write_native(tmp_path / "cache", 40, 4)
    build_manifest(root)
    errors: list[BaseException] = []
    for round_ in range(20):
        barrier = threading.Barrier(8)

        def open_it(n: int) -> None:
            try:
                barrier.wait()
                # Through a local cache too: its open copies the manifest table and maps it, in every thread.
                remote = ShardStore.open(f"file://{root}", local_cache=tmp_path / f"node{round_}-{n % 2}",
                                         cache_limit="64MB")
                assert ShardStore.open(root).num_samples == remote.num_samples == 40
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=open_it, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []
