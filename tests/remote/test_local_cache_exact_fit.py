"""A shard whose reservation brings usage exactly to cache_limit fits: it is fetched at once."""

from __future__ import annotations

from pathlib import Path

import pytest

import shardstore.remote.local_cache as local_cache
from tests.remote.test_local_cache import FakeStore, file_ok, make_shard, open_cache


def test_reservation_exactly_at_the_limit_is_fetched_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = FakeStore(tmp_path / "store")
    shard = make_shard(store, 1)
    # What the reservation measures in a cache opened like the one below: usage then, and the bytes it needs.
    seen: list[tuple[int, int]] = []
    real_usage = local_cache.disk_usage
    probe = open_cache(tmp_path / "probe", store)
    real_reserve = probe._reserve

    def reserve(name, need, deadline, allocate):  # noqa: ANN001, ANN202
        seen.append((real_usage(probe._root, empty=(probe._locks,)), need))
        return real_reserve(name, need, deadline, allocate)

    monkeypatch.setattr(probe, "_reserve", reserve)
    probe.ensure(shard)
    assert seen
    limit = max(usage + need for usage, need in seen)  # the tightest reservation ends exactly at the limit

    cache = open_cache(tmp_path / "cache", store, limit=limit, space_timeout=0.2)
    cache.ensure(shard)  # short == 0: nothing to evict, and the shard fits
    assert all(file_ok(tmp_path / "cache", f) for f in shard.files)
