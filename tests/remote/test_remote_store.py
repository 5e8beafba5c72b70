"""A cache in object storage read through a node-local cache: the same batches as from local disk, each shard
fetched once, ``cache_limit`` respected, one-line errors for what users get wrong."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from shardstore.dataset.subset import RandomShardSubsetCachedDataset
from shardstore.errors import ConfigError, ShardstoreError
from shardstore.loader.shard_loader import ShardLoader
from shardstore.manifest.build import build_manifest
from shardstore.store.reader import ShardStore
from tests.conftest import errors_in_threads, write_native
from tests.remote.conftest import assert_same, du, read_epochs


def _cache(tmp_path: Path, n: int = 256, shard: int = 16) -> Path:
    root = write_native(tmp_path / "cache", n, shard)
    build_manifest(root)
    return root


def test_a_file_url_reads_every_sample_the_local_store_reads(tmp_path: Path) -> None:
    root = _cache(tmp_path)
    local = ShardStore.open(root)
    remote = ShardStore.open(f"file://{root}", local_cache=tmp_path / "node", cache_limit="64MB")
    assert remote.remote is not None and remote.num_samples == local.num_samples
    assert repr(remote).startswith("ShardStore('file://")
    for sample_id in range(0, local.num_samples, 7):
        got, want = remote.sample(sample_id), local.sample(sample_id)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])
    # Only the shards read were brought in, under the bucket's own names.
    assert (tmp_path / "node" / "shard_000000" / "images.npy").exists()


@pytest.mark.slow
def test_s3_epochs_equal_the_local_store_and_fetch_each_shard_once(tmp_path: Path, s3_server, s3_proxy, bucket,
                                                                    aws_env) -> None:
    root = _cache(tmp_path)
    s3_server.upload_tree(root, bucket, "cache")
    local = ShardStore.open(root)
    store = ShardStore.open(f"s3://{bucket}/cache", local_cache=tmp_path / "node", cache_limit="64MB")
    s3_proxy.reset()

    def loader_of(s: ShardStore) -> ShardLoader:
        ds = RandomShardSubsetCachedDataset(s, shards_per_epoch=4, random_subset_seed=3, batch_size=8)
        return ShardLoader(ds, batch_size=8, num_threads=2)

    with loader_of(local) as a, loader_of(store) as b:
        assert_same(read_epochs(a, [0, 1, 2]), read_epochs(b, [0, 1, 2]))
    stats = s3_proxy.stats()
    sizes = {f"{bucket}/cache/{p.relative_to(root)}": p.stat().st_size for p in root.rglob("*.npy")}
    fetched = {k: v for k, v in stats.items() if k in sizes and v.body_bytes}
    assert fetched, "no shard came through the proxy"
    for key, st in fetched.items():
        assert st.body_bytes == sizes[key], f"{key}: {st.body_bytes} bytes fetched for a {sizes[key]}-byte file"


def test_cache_limit_below_the_read_ahead_is_one_line_at_open(tmp_path: Path) -> None:
    root = _cache(tmp_path)
    with pytest.raises(ShardstoreError, match=r"cache_limit .* below .* raise cache_limit") as info:
        ShardStore.open(f"file://{root}", local_cache=tmp_path / "node", cache_limit="20KB")
    assert "\n" not in str(info.value)


def test_a_url_root_needs_local_cache_and_cache_limit(tmp_path: Path) -> None:
    root = _cache(tmp_path)
    with pytest.raises(ShardstoreError, match="local_cache"):
        ShardStore.open(f"file://{root}")
    with pytest.raises(ShardstoreError, match="cache_limit"):
        ShardStore.open(f"file://{root}", local_cache=tmp_path / "node")


def test_one_local_cache_serves_one_bucket_prefix(tmp_path: Path) -> None:
    a = _cache(tmp_path / "a")
    b = _cache(tmp_path / "b")
    ShardStore.open(f"file://{a}", local_cache=tmp_path / "node", cache_limit="64MB")
    with pytest.raises(ShardstoreError, match="holds shards of .* own local_cache"):
        ShardStore.open(f"file://{b}", local_cache=tmp_path / "node", cache_limit="64MB")


def test_the_claim_is_never_seen_half_written_and_an_empty_one_is_replaced(tmp_path: Path) -> None:
    """A rank killed between creating the claim and writing it (an older version wrote it in place) left an empty
    file that refused every later open; ranks opening at once never see a claim that is still being written."""
    a = _cache(tmp_path / "a")
    node = tmp_path / "node"
    (node / ".shardstore").mkdir(parents=True)
    (node / ".shardstore" / "source").write_text("")
    ShardStore.open(f"file://{a}", local_cache=node, cache_limit="64MB")
    assert (node / ".shardstore" / "source").read_text() == f"file://{a}\n"
    assert errors_in_threads(lambda n: ShardStore.open(f"file://{a}", local_cache=tmp_path / f"fresh{n % 2}",
                                                       cache_limit="64MB")) == []
    assert sorted(p.name for p in (node / ".shardstore").iterdir() if p.name.startswith(".source-")) == []


def test_data_config_spells_the_remote_settings(tmp_path: Path) -> None:
    from shardstore.config.data import data_config_from_dict

    cfg = data_config_from_dict({"cache_root": "s3://bucket/cache", "local_cache": "/scratch/c",
                                 "cache_limit": "512MiB", "storage_options": {"region": "eu-west-1"}})
    assert cfg.cache_limit == 512 << 20 and cfg.storage_options == {"region": "eu-west-1"}
    with pytest.raises(ConfigError, match="local_cache"):
        data_config_from_dict({"cache_root": "s3://bucket/cache", "cache_limit": 10**9})
    with pytest.raises(ConfigError, match="cache_limit"):
        data_config_from_dict({"cache_root": "s3://bucket/cache", "local_cache": "/x", "cache_limit": "lots"})
    with pytest.raises(ConfigError, match="URL of a kind"):
        data_config_from_dict({"cache_root": "http://example.com/cache"})


@pytest.mark.slow
def test_the_local_cache_stays_under_its_limit_over_many_epochs(tmp_path: Path) -> None:
    root = _cache(tmp_path, n=64 * 16, shard=16)  # 64 shards
    store = ShardStore.open(f"file://{root}", local_cache=tmp_path / "node", cache_limit="600KB",
                            prefetch_shards=2)
    ds = RandomShardSubsetCachedDataset(store, shards_per_epoch=4, random_subset_seed=1, batch_size=8)
    peak = 0
    with ShardLoader(ds, batch_size=8, num_threads=2) as loader:
        for e in range(12):
            loader.set_epoch(e)
            for _ in loader:
                peak = max(peak, du(tmp_path / "node"))  # the directory's own block too, as the limit counts
    assert 0 < peak <= 600_000
    assert store.remote.cache.stats.evictions > 0


def test_eviction_order_follows_the_seeded_schedule(tmp_path: Path) -> None:
    from shardstore.sampling.plan import plan_epoch
    from shardstore.store.remote import shard_name

    root = _cache(tmp_path, n=32 * 16, shard=16)
    store = ShardStore.open(f"file://{root}", local_cache=tmp_path / "node", cache_limit="64MB")
    ds = RandomShardSubsetCachedDataset(store, shards_per_epoch=4, random_subset_seed=5, batch_size=8)
    ds.set_epoch(3)
    next_use = store.remote.next_use
    assert next_use is not None

    def ids_of(epoch: int) -> list[int]:
        positions = plan_epoch(store.counts, store.offsets, ds.spec, epoch).shard_positions
        return [int(store.shard_ids[p]) for p in positions]

    for sid in ids_of(3):
        assert next_use(shard_name(sid)) == 0  # this epoch's shards come last
    for sid in set(ids_of(4)) - set(ids_of(3)):
        assert next_use(shard_name(sid)) == 1
    later = {sid for e in range(3, 3 + ds.NEXT_USE_HORIZON + 1) for sid in ids_of(e)}
    never = [sid for sid in store.shard_ids.tolist() if sid not in later]
    for sid in never:
        assert next_use(shard_name(sid)) == float("inf")
    # The prefetcher was told this epoch's shards, then the next epoch's.
    remote = store.remote
    assert [int(m.ids[p]) for m, p, _ in remote._plan] == ids_of(3)
    assert [int(m.ids[p]) for m, p, _ in remote._next] == ids_of(4)


@pytest.mark.slow  # over 0.3 s
def test_a_store_nobody_uses_any_more_stops_its_prefetch_threads(tmp_path: Path) -> None:
    import gc
    import threading
    import time

    def prefetchers() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name.startswith("shardstore-prefetch")}

    others = prefetchers()  # of stores earlier tests still hold: not this test's business
    root = _cache(tmp_path)
    store = ShardStore.open(f"file://{root}", local_cache=tmp_path / "node", cache_limit="64MB")
    ds = RandomShardSubsetCachedDataset(store, shards_per_epoch=4, random_subset_seed=3, batch_size=8)
    ds.set_epoch(0)
    progress = store.remote._progress_path
    mine = prefetchers() - others
    assert mine and progress.exists()
    del store, ds
    deadline = time.monotonic() + 5
    while mine & prefetchers() and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.05)
    assert not mine & prefetchers(), "prefetch threads outlived their store"
    assert not progress.exists()


def test_the_read_ahead_check_counts_every_rank_of_the_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _cache(tmp_path)
    ShardStore.open(f"file://{root}", local_cache=tmp_path / "a", cache_limit="600KB")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    with pytest.raises(ShardstoreError, match="each of the node's 8 ranks"):
        ShardStore.open(f"file://{root}", local_cache=tmp_path / "b", cache_limit="600KB")


def test_progress_files_of_dead_ranks_are_removed_at_open(tmp_path: Path) -> None:
    root = _cache(tmp_path)
    progress = tmp_path / "node" / ".shardstore" / "progress"
    progress.mkdir(parents=True)
    dead = progress / "999999999-abcd1234"
    alive = progress / f"{os.getpid()}-abcd1234"
    for p in (dead, alive, dead.with_name(dead.name + ".failed")):
        p.write_bytes(b"\0" * 8)
    ShardStore.open(f"file://{root}", local_cache=tmp_path / "node", cache_limit="64MB")
    assert not dead.exists() and not dead.with_name(dead.name + ".failed").exists() and alive.exists()
