"""``shardstore cache-teacher`` (plain and ``--overwrite``) killed with SIGKILL at random moments: the cache's own
files are never touched, a shard's stored targets are visible whole or not at all and equal an uninterrupted fill,
the declaration and manifest always parse, and a rerun completes the fill and removes the temporaries."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from shardstore.store.groups import GroupSpec
from shardstore.store.reader import load_manifest

from .harness import (
    assert_visible_npy_load,
    cli,
    cli_start,
    file_digests,
    kill_delay,
    kill_fractions,
    plant_stale,
    run_sets,
    temporaries,
    tiny_cache,
    warm,
)

SEED = 14
KILLS = 30
KILLS_PER_CHAIN = 6
NUM_SHARDS = 12
FILL = ("--views", "2", "--topk", "3", "--device", "cpu")
GROUP_FILES = "shard_*/teacher_*.npy"


def check_after_kill(root: Path, base: dict[str, bytes], want: dict[str, bytes]) -> int:
    """Nothing of the cache lost or changed; stored targets whole and right; returns the shards that have them."""
    assert_visible_npy_load(root)
    assert file_digests(root, "shard_*/[il]*.npy") == base, "the cache's own images or labels changed"
    got = file_digests(root, GROUP_FILES)
    for rel, data in got.items():
        assert data == want[rel], f"{rel} differs from an uninterrupted fill"
    declaration = root / "teacher.fields.json"
    if declaration.exists():
        GroupSpec.from_json(declaration.read_text(), str(declaration))
    load_manifest(root, check="all")  # the header and the table it names, whole and of one snapshot
    return sum(1 for rel in got if rel.endswith("teacher_views.npy"))


@pytest.mark.slow
def test_cache_teacher_killed_at_random_points_fills_exactly_once(tmp_path: Path) -> None:
    pristine = tiny_cache(tmp_path / "pristine", num_shards=NUM_SHARDS)
    base = file_digests(pristine, "shard_*/[il]*.npy")
    assert len(base) == 2 * NUM_SHARDS
    warm()
    filled = tmp_path / "filled"
    shutil.copytree(pristine, filled)
    whole = cli("cache-teacher", *run_sets(tmp_path / "run", filled), *FILL)
    assert whole.code == 0, whole.describe()
    want = file_digests(filled, GROUP_FILES)
    assert len(want) == 4 * NUM_SHARDS
    startup = cli("cache-teacher", *run_sets(tmp_path / "run", tmp_path / "missing"), *FILL).seconds
    fractions = kill_fractions(SEED)

    kills = finished_early = chains = left_behind = 0
    while kills < KILLS and chains < 4 * KILLS // KILLS_PER_CHAIN:
        # Odd chains replace a complete fill with --overwrite, even ones fill an empty cache.
        overwrite = chains % 2 == 1
        args = (*FILL, "--overwrite") if overwrite else FILL
        root = tmp_path / "cache"
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(filled if overwrite else pristine, root)
        chains += 1
        have = NUM_SHARDS if overwrite else 0
        for _ in range(KILLS_PER_CHAIN):
            remaining = 1.0 if overwrite else 1 - have / NUM_SHARDS
            child = cli_start("cache-teacher", *run_sets(tmp_path / "run", root), *args)
            time.sleep(kill_delay(next(fractions), startup, whole.seconds, remaining))
            child.kill()
            outcome = child.wait()
            if outcome.code == 0:
                finished_early += 1
                break
            assert outcome.code == -9, outcome.describe()
            kills += 1
            have = check_after_kill(root, base, want)
            left_behind += len(temporaries(root))
        # What a fill killed while writing a shard's targets leaves (in a shard it did not finish).
        unfinished = [d for d in sorted(root.glob("shard_*")) if len(list(d.glob("teacher_*.npy"))) < 4]
        if unfinished:
            plant_stale(unfinished[-1], "teacher_views.npy")
        plant_stale(root, "teacher.fields.json")
        plant_stale(root, "manifest.json")
        rerun = cli("cache-teacher", *run_sets(tmp_path / "run", root), *FILL)
        assert rerun.code == 0, rerun.describe()
        assert temporaries(root) == [], "temporaries of killed fills were left behind"
        check_after_kill(root, base, want)
        assert file_digests(root, GROUP_FILES) == want, "the finished fill differs from an uninterrupted one"
        manifest = load_manifest(root, check="all")
        fields = [f"teacher_{n}" for n in ("views", "topk_index", "topk_logp", "tail_logp")]
        assert manifest.positions_with(fields).tolist() == list(range(NUM_SHARDS)), \
            "the manifest misses targets of some shards"
    assert kills >= KILLS // 2, f"only {kills} kills landed while a fill was going"
    print(f"\nattack cache-teacher: {kills} SIGKILLs survived over {chains} chains, half of them --overwrite "
          f"({finished_early} runs finished before their kill came, {left_behind} temporaries seen after kills; an "
          f"uninterrupted fill took {whole.seconds:.2f} s); cache files untouched, targets bit-identical")
