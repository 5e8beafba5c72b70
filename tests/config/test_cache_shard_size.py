"""``cache_shard_size`` is checked against the manifest before training, in one line naming the key and the fix."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from shardstore import ConfigError, ShardStore, ShardWriter, build_manifest
from shardstore.cli import main
from shardstore.manifest.shard_size import check_cache_shard_size, manifest_shard_size
from tests.kd.conftest import overrides, write_tiny_cache


def cache(root: Path, sizes: list[int]) -> ShardStore:
    """A cache whose shards hold ``sizes`` samples (written by one writer per shard)."""
    for shard_id, n in enumerate(sizes):
        with ShardWriter(root, max(sizes), start_shard=shard_id, num_shards=1, fsync=False) as w:
            w.add_batch({"labels": np.arange(n, dtype=np.int64)})
    build_manifest(root)
    return ShardStore.open(root)


def test_the_manifest_shard_size_is_the_largest_shard() -> None:
    assert manifest_shard_size(np.array([32, 32, 7, 32])) == 32
    assert manifest_shard_size(np.array([], dtype=np.int64)) == 0


@pytest.mark.parametrize("sizes", [[32, 32, 32], [32, 32, 5], [32, 5, 32, 9], [5]])
def test_a_matching_or_unset_size_passes(tmp_path: Path, sizes: list[int]) -> None:
    store = cache(tmp_path / "c", sizes)
    check_cache_shard_size(store, 32)  # a writer's last shard may be short; one short shard is a writer's last
    check_cache_shard_size(store, None)


@pytest.mark.parametrize(("sizes", "setting", "says"), [
    ([32, 32, 32], 2048, "3 shards of 32 samples"),  # the seed's default against a cache written with 32
    ([32, 32, 7], 16, "3 shards of 32 samples (1 shorter)"),  # shards larger than the setting
    ([20, 20], 32, "2 shards of 20 samples"),  # no shard of the setting's size
])
def test_a_mismatch_is_one_line_naming_the_key_and_the_fix(tmp_path: Path, sizes: list[int], setting: int,
                                                           says: str) -> None:
    store = cache(tmp_path / "c", sizes)
    actual = max(sizes)
    message = (f"data_config: `cache_shard_size` is {setting:,}, but the manifest of {store.root} says {says}; "
               f"set cache_shard_size: {actual} (or null to take it from the manifest)")
    with pytest.raises(ConfigError, match="^" + re.escape(message) + "$"):
        check_cache_shard_size(store, setting)


def test_train_refuses_a_mismatch_before_the_run_starts(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = write_tiny_cache(tmp_path / "cache", num_shards=4, shard_size=32)
    sets = [a for o in overrides(tmp_path / "run", root, train__epochs=1, train__eval__held_out_shards=1,
                                 data__cache_shard_size=2048) for a in ("--set", o)]
    assert main(["train", *sets]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "`cache_shard_size` is 2,048, but the manifest of" in err[0], err
    assert err[0].endswith("set cache_shard_size: 32 (or null to take it from the manifest)")
    assert not (tmp_path / "run").exists()  # refused before the run directory is made
