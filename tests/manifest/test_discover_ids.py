"""Native shard directories whose 19-digit id does not fit an int64 are left out with a message."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shardstore import ShardStore, build_manifest


def test_nineteen_digit_id_above_int64_is_a_problem_not_a_shard(tmp_path: Path) -> None:
    for name in ("shard_000000", "shard_9999999999999999999"):
        (tmp_path / name).mkdir()
        np.save(tmp_path / name / "x.npy", np.arange(3, dtype=np.int64))
    report = build_manifest(tmp_path)
    assert [p.path for p in report.problems] == ["shard_9999999999999999999"]
    assert "larger than 9,223,372,036,854,775,807" in report.problems[0].reason
    assert "left out" in report.problems[0].reason
    store = ShardStore.open(tmp_path)
    assert store.num_shards == 1
    np.testing.assert_array_equal(store.field(0, "x"), np.arange(3))
