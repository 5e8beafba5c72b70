"""``shardstore build-manifest`` killed with SIGKILL at random moments: ``manifest.json`` is always the old one or
the new one (never a mix), no shard file is touched, and a rerun writes the manifest an uninterrupted build writes
and removes the temporaries the killed builds left behind."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from shardstore.manifest.model import Manifest
from tests.conftest import write_native

from .harness import cli, cli_start, file_digests, kill_delay, kill_fractions, plant_stale, temporaries, warm

SEED = 13
KILLS = 30
KILLS_PER_RERUN = 6


def put_back(path: Path, text: str) -> None:
    """Restore the old manifest the way an atomic writer would (the test is not under attack here)."""
    tmp = path.with_name("restore.partial")
    tmp.write_text(text)
    os.replace(tmp, path)


@pytest.mark.slow
def test_build_manifest_killed_at_random_points_keeps_a_whole_manifest(tmp_path: Path) -> None:
    root = write_native(tmp_path / "cache", 600, 2)  # 300 shards x 3 fields
    shard_files = file_digests(root)
    warm()
    first = cli("build-manifest", root)
    assert first.code == 0, first.describe()
    manifest = root / "manifest.json"
    old = manifest.read_text()
    whole = cli("build-manifest", "--checksum", "--full", root)
    assert whole.code == 0, whole.describe()
    new = manifest.read_text()
    assert old != new and len(Manifest.from_json(new).shards) == 300
    put_back(manifest, old)
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
        text = manifest.read_text()
        assert text in (old, new), "manifest.json is neither the old nor the new manifest after a kill"
        Manifest.from_json(text, str(manifest))
        assert file_digests(root) == shard_files, "a shard file changed while building the manifest"
        if text == new:
            put_back(manifest, old)
        if kills and kills % KILLS_PER_RERUN == 0 or kills >= KILLS:
            plant_stale(root, "manifest.json")
            rerun = cli("build-manifest", "--checksum", "--full", root)
            reruns += 1
            assert rerun.code == 0, rerun.describe()
            assert manifest.read_text() == new, "a rerun after kills wrote another manifest than an uninterrupted build"
            assert temporaries(root) == [live.name], "temporaries of killed builds were left behind"
            put_back(manifest, old)
    assert kills >= KILLS // 2, f"only {kills} kills landed while a build was going"
    print(f"\nattack build-manifest: {kills} SIGKILLs survived ({finished_early} builds finished before their kill "
          f"came, {reruns} reruns, {left_behind} temporaries seen after kills; an uninterrupted build took "
          f"{whole.seconds:.2f} s); manifest always whole, shard files untouched")
