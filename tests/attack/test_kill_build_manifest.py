"""``shardstore build-manifest`` killed with SIGKILL at random moments: the manifest (``manifest.json`` and the table
it names) is always the old one or the new one (never a mix), no shard file is touched, and a rerun writes the
manifest an uninterrupted build writes and removes the temporaries the killed builds left behind."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from shardstore.store.reader import load_manifest
from tests.conftest import write_native

from .harness import (
    cli,
    cli_start,
    file_digests,
    kill_delay,
    kill_fractions,
    plant_stale,
    temporaries,
    warm,
)

SEED = 13
KILLS = 30
KILLS_PER_RERUN = 6


def put_back(path: Path, text: str) -> None:
    """Restore the old header the way an atomic writer would (the test is not under attack here); a build keeps
    the table the current header names, so the old table is still there."""
    tmp = path.with_name("restore.partial")
    tmp.write_text(text)
    os.replace(tmp, path)


@pytest.mark.slow
def test_build_manifest_killed_at_random_points_keeps_a_whole_manifest(tmp_path: Path) -> None:
    root = write_native(tmp_path / "cache", 600, 2)  # 300 shards x 3 fields
    shard_files = file_digests(root, "shard_*/*.npy")
    warm()
    first = cli("build-manifest", root)
    assert first.code == 0, first.describe()
    manifest = root / "manifest.json"
    old = manifest.read_text()
    old_manifest = load_manifest(root)
    whole = cli("build-manifest", "--checksum", "--full", root)
    assert whole.code == 0, whole.describe()
    new_manifest = load_manifest(root)
    assert new_manifest != old_manifest and new_manifest.num_shards == 300
    assert all(new_manifest.checksummed(f).all() for f in new_manifest.fields)
    put_back(manifest, old)
    assert load_manifest(root) == old_manifest
    startup = cli("build-manifest", tmp_path / "missing").seconds
    fractions = kill_fractions(SEED)

    # A live writer's temporary (this process's pid) is never removed; dead writers' ones are.
    live = root / f".manifest.json.tmp-{os.getpid()}-0ddba11"
    live.write_text("another build-manifest, still writing")
    kills = finished_early = reruns = left_behind = 0
    attempts = 0
    while kills < KILLS and attempts < 3 * KILLS:
        attempts += 1
        child = cli_start("build-manifest", "--checksum", "--full", root)
        time.sleep(kill_delay(next(fractions), startup, whole.seconds))
        child.kill()
        outcome = child.wait()
        if outcome.code == 0:
            finished_early += 1
        else:
            assert outcome.code == -9, outcome.describe()
            kills += 1
        left_behind += len(temporaries(root)) - 1
        now = load_manifest(root, check="all")  # the header and the whole table it names
        assert now in (old_manifest, new_manifest), "the manifest is neither the old nor the new one after a kill"
        assert file_digests(root, "shard_*/*.npy") == shard_files, "a shard file changed while building the manifest"
        if manifest.read_text() != old:
            put_back(manifest, old)
        if kills and kills % KILLS_PER_RERUN == 0 or kills >= KILLS:
            plant_stale(root, "manifest.json")
            rerun = cli("build-manifest", "--checksum", "--full", root)
            reruns += 1
            assert rerun.code == 0, rerun.describe()
            assert load_manifest(root) == new_manifest, "a rerun after kills wrote another manifest than a whole build"
            assert temporaries(root) == [live.name], "temporaries of killed builds were left behind"
            put_back(manifest, old)
    assert kills >= KILLS // 2, f"only {kills} kills landed while a build was going"
    print(f"\nattack build-manifest: {kills} SIGKILLs survived ({finished_early} builds finished before their kill "
          f"came, {reruns} reruns, {left_behind} temporaries seen after kills; an uninterrupted build took "
          f"{whole.seconds:.2f} s); manifest always whole, shard files untouched")
