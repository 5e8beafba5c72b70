"""``shardstore write`` killed with SIGKILL at random moments and run again: a shard is visible whole or not at
all, the shards written before a kill survive it byte for byte, and a rerun finishes the cache exactly as an
uninterrupted run writes it, cleaning the killed writers' temporaries."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from shardstore.store.reader import load_manifest

from .harness import (
    assert_visible_npy_load,
    cli,
    cli_start,
    file_digests,
    kill_delay,
    kill_fractions,
    plant_stale,
    temporaries,
    warm,
)

SEED = 12
KILLS = 30
KILLS_PER_CHAIN = 8
NUM, SHARD = 800, 8  # 100 shards
SHARDS = "shard_*"  # the shard files (manifest.d/ holds the manifest's table: checked by loading the manifest)


def write_inputs(folder: Path) -> list[str]:
    folder.mkdir()
    rng = np.random.default_rng(0)
    np.save(folder / "images.npy", rng.integers(0, 255, (NUM, 3, 16, 16), dtype=np.uint8))
    np.save(folder / "labels.npy", rng.integers(0, 10, NUM).astype(np.int64))
    return [f"--from-npy=images={folder / 'images.npy'}", f"--from-npy=labels={folder / 'labels.npy'}",
            f"--shard-size={SHARD}"]


def check_after_kill(root: Path, want: dict[str, bytes], seen: dict[str, bytes]) -> dict[str, bytes]:
    """No partial shard visible, every visible file is the uninterrupted run's, nothing seen before is gone."""
    assert_visible_npy_load(root)
    now = file_digests(root, SHARDS)
    for rel, data in now.items():
        assert data == want[rel], f"{rel} differs from what an uninterrupted write puts there"
    shards = {rel.split("/")[0] for rel in now}
    for shard in shards:
        files = sorted(rel.split("/")[1] for rel in now if rel.startswith(shard + "/"))
        assert files == ["ids.npy", "images.npy", "labels.npy"], f"{shard} is visible but has only {files}"
    lost = sorted(set(seen) - set(now))
    assert not lost, f"files present before the kill are gone: {lost[:5]}"
    if (root / "manifest.json").exists():
        parsed = load_manifest(root, check="all")
        for s in parsed.shards:
            for f in s.files.values():
                assert (root / f.path).stat().st_size == f.bytes, f"{f.path} does not match the manifest"
    return now


@pytest.mark.slow
def test_write_killed_at_random_points_loses_nothing_and_a_rerun_finishes(tmp_path: Path) -> None:
    args = write_inputs(tmp_path / "inputs")
    warm()
    whole = cli("write", tmp_path / "whole", *args)
    assert whole.code == 0, whole.describe()
    want = file_digests(tmp_path / "whole", SHARDS)
    want_manifest = load_manifest(tmp_path / "whole")
    assert len(want_manifest.shards) == NUM // SHARD
    startup = cli("write", tmp_path / "none", f"--from-npy=images={tmp_path / 'missing.npy'}").seconds
    fractions = kill_fractions(SEED)

    kills = finished_early = chains = left_behind = 0
    while kills < KILLS and chains < 4 * KILLS // KILLS_PER_CHAIN:
        root = tmp_path / "cache"
        shutil.rmtree(root, ignore_errors=True)
        chains += 1
        seen: dict[str, bytes] = {}
        for _ in range(KILLS_PER_CHAIN):
            remaining = 1 - sum(1 for rel in seen if rel.endswith("ids.npy")) / len(want_manifest.shards)
            child = cli_start("write", root, *args)
            time.sleep(kill_delay(next(fractions), startup, whole.seconds, remaining))
            child.kill()
            outcome = child.wait()
            if outcome.code == 0:
                finished_early += 1
                break
            assert outcome.code == -9, outcome.describe()
            kills += 1
            seen = check_after_kill(root, want, seen)
            left_behind += len(temporaries(root))
        if root.exists():  # what a writer killed in the middle of a shard or of the manifest leaves
            plant_stale(root, "shard_000099", directory_too=True)
            plant_stale(root, "manifest.json")
        rerun = cli("write", root, *args)
        assert rerun.code == 0, rerun.describe()
        assert temporaries(root) == [], "the killed writers' temporaries were left behind"
        assert file_digests(root, SHARDS) == want, "the finished cache differs from an uninterrupted write"
        manifest = load_manifest(root, check="all")
        assert [(s.id, s.num_samples) for s in manifest.shards] == [(s.id, s.num_samples) for s in want_manifest.shards]
    assert kills >= KILLS // 2, f"only {kills} kills landed while a write was going"
    print(f"\nattack write: {kills} SIGKILLs survived over {chains} chains ({finished_early} runs finished before "
          f"their kill came, {left_behind} temporaries seen after kills; an uninterrupted write took "
          f"{whole.seconds:.2f} s); no partial shard visible, nothing lost, reruns equal an uninterrupted write")
