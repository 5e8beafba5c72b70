"""A cache that grows while training runs (``refresh_manifest``): new shards join at the next ``set_epoch``, a run
killed mid-epoch after growth resumes bit-identically, lost or changed shards are refused, ranks plan on one
generation, ``DataLoader`` workers follow the main process, and the config key."""

from __future__ import annotations

import inspect
import json
import math
import random
import shutil
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from shardstore import ConfigError, ManifestError, ShardStore, ShardWriter, build_manifest
from shardstore.cli import main
from shardstore.config.data import load_data_config
from shardstore.dataset.subset import RandomShardSubsetCachedDataset
from shardstore.loader import ShardLoader
from shardstore.sampling.shards import permutation_shards


def shard_arrays(shard_id: int, rows: int) -> dict[str, np.ndarray]:
    """Rows of shard ``shard_id``: ``gid`` is ``1000 * shard_id + row``, ``image`` derives from it."""
    gid = np.arange(1000 * shard_id, 1000 * shard_id + rows, dtype=np.int64)
    image = ((gid[:, None, None, None] * 7 + np.arange(12).reshape(1, 3, 2, 2)) % 251).astype(np.uint8)
    return {"gid": gid, "image": image}


# The writer subprocesses run the very same definition.
DATA_SOURCE = "import numpy as np\n\n" + inspect.getsource(shard_arrays)

INITIAL = {0: 8, 1: 8, 2: 5, 3: 8, 4: 8, 5: 6}  # shard id -> rows
BATCH = 4


def write_shards(root: Path, shards: dict[int, int], layout: str = "native") -> None:
    """Write ``shards`` (id -> rows) in this process, natively (one ShardWriter per shard) or flat (``np.save``)."""
    root.mkdir(parents=True, exist_ok=True)
    for shard_id, rows in shards.items():
        arrays = shard_arrays(shard_id, rows)
        if layout == "native":
            with ShardWriter(root, rows, start_shard=shard_id, num_shards=1, fsync=False) as w:
                w.add_batch(arrays)
        else:
            for name, array in arrays.items():
                np.save(root / f"{name}_{shard_id:06d}.npy", array)


def grow(root: Path, shards: dict[int, int], layout: str = "native") -> None:
    """Add ``shards`` and rebuild the manifest (in this process)."""
    write_shards(root, shards, layout)
    build_manifest(root)


def make_cache(root: Path, shards: dict[int, int] | None = None, layout: str = "native") -> Path:
    grow(root, INITIAL if shards is None else shards, layout)
    return root


GROW_SCRIPT = DATA_SOURCE + textwrap.dedent('''
    import subprocess, sys
    from pathlib import Path

    root, layout = Path(sys.argv[1]), sys.argv[2]
    for spec in sys.argv[3:]:
        shard_id, rows = map(int, spec.split(":"))
        arrays = shard_arrays(shard_id, rows)
        if layout == "native":
            from shardstore import ShardWriter
            with ShardWriter(root, rows, start_shard=shard_id, num_shards=1, fsync=False) as w:
                w.add_batch(arrays)
        else:
            for name, array in arrays.items():
                np.save(root / f"{name}_{shard_id:06d}.npy", array)
    subprocess.run([sys.executable, "-m", "shardstore", "build-manifest", str(root)], check=True,
                   stdout=subprocess.DEVNULL)
''')


def grow_in_another_process(root: Path, shards: dict[int, int], layout: str) -> subprocess.Popen:
    """Start a process that writes ``shards`` and then runs ``shardstore build-manifest ROOT``."""
    return subprocess.Popen([sys.executable, "-c", GROW_SCRIPT, str(root), layout,
                             *(f"{i}:{n}" for i, n in shards.items())], stderr=subprocess.PIPE, text=True)


def make(store: ShardStore | Path, k: int | None = None, policy: str = "random", **kwargs: Any
         ) -> RandomShardSubsetCachedDataset:
    kwargs.setdefault("batch_size", BATCH)
    kwargs.setdefault("refresh_manifest", True)
    if isinstance(store, Path):
        store = ShardStore.open(store)
    return RandomShardSubsetCachedDataset(store, k, 5, policy, **kwargs)


def expected(store: ShardStore, ids: np.ndarray) -> dict[str, torch.Tensor]:
    """Plain indexing: the samples ``ids`` name, read one by one, stacked."""
    samples = [store.sample(int(i)) for i in ids]
    return {name: torch.from_numpy(np.stack([s[name] for s in samples])) for name in store.fields}


def assert_batches_are_plain_indexing(batches: list[dict[str, torch.Tensor]], ds: RandomShardSubsetCachedDataset,
                                      start: int = 0) -> None:
    """``batches`` (from batch ``start`` of the current epoch on) are ``ds.store.sample`` over ``ds.indices()``."""
    ids = ds.indices()
    assert len(batches) == ids.size // ds.batch_size - start
    for b, batch in enumerate(batches, start):
        want = expected(ds.store, ids[b * ds.batch_size:(b + 1) * ds.batch_size])
        for name, tensor in want.items():
            assert torch.equal(batch[name], tensor), f"batch {b}, field {name}"


def shards_of(batches: list[dict[str, torch.Tensor]]) -> set[int]:
    return {int(g) // 1000 for b in batches for g in b["gid"]}


def take(loader: ShardLoader, stop_after: int | None = None) -> list[dict[str, torch.Tensor]]:
    """The loader's batches (copies: a CPU loader reuses its buffers), all of them or the first ``stop_after``."""
    out = []
    for batch in loader:
        out.append({k: v.clone() for k, v in batch.items()})
        if stop_after is not None and len(out) == stop_after:
            break
    return out


def assert_same_batches(got: list[dict[str, torch.Tensor]], want: list[dict[str, torch.Tensor]], what: str) -> None:
    assert len(got) == len(want), f"{what}: {len(got)} batches, the uninterrupted run had {len(want)}"
    for b, (x, y) in enumerate(zip(got, want)):
        assert x.keys() == y.keys()
        for name in x:
            assert torch.equal(x[name], y[name]), f"{what}: batch {b}, field {name} differs"


# -- 1. a cache that grows between epochs ---------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["native", "flat"])
@pytest.mark.parametrize("refresh", [True, False], ids=["refresh", "no-refresh"])
@pytest.mark.slow
def test_shards_written_by_another_process_join_at_the_next_set_epoch(tmp_path: Path, layout: str,
                                                                      refresh: bool) -> None:
    root = make_cache(tmp_path / "cache", layout=layout)
    ds = make(root, None, refresh_manifest=refresh)  # the whole cache each epoch: which shards is deterministic
    new = {6: 8, 7: 3, 9: 8}
    with ShardLoader(ds, num_threads=2, prefetch=2) as loader:
        assert sorted(loader.set_epoch(0)) == sorted(INITIAL)
        batches, grower = [], None
        for b, batch in enumerate(loader):
            batches.append({k: v.clone() for k, v in batch.items()})
            if b == 0:  # another process grows the cache while this epoch is read
                grower = grow_in_another_process(root, new, layout)
            if b == 1:
                assert grower is not None
                _, err = grower.communicate(timeout=120)
                assert grower.returncode == 0, err
        assert ShardStore.open(root).num_shards == len(INITIAL) + len(new), "the other process did not grow it"
        # The epoch under way is read on the snapshot it was planned on, to its end.
        assert shards_of(batches) == set(INITIAL)
        assert_batches_are_plain_indexing(batches, ds)

        for epoch in (1, 2):  # the next epoch was prepared on the old snapshot; set_epoch re-plans it
            ids = loader.set_epoch(epoch)
            assert ids == ds.selected_shards and len(set(ids)) == len(ids)
            want = set(INITIAL) | set(new) if refresh else set(INITIAL)
            assert set(ids) == want
            batches = take(loader)
            assert_batches_are_plain_indexing(batches, ds)
            assert shards_of(batches) <= want and shards_of(batches) >= want - {7}  # shard 7 may be a cut remainder
            assert ds.store.num_shards == len(want)


# -- 2. a run killed mid-epoch after growth resumes bit-identically -------------------------------------------------

# Shards that appear before set_epoch(epoch): the same in every run.
GROWTH = {1: {6: 8, 7: 7}, 2: {8: 8, 9: 3, 10: 8}, 3: {11: 8}}
EPOCHS = 4
STOP_EPOCH = 1  # the interrupted epoch follows a growth; GROWTH[2] arrives while the run is down (or after)


def loader_over(root: Path, setting: dict[str, Any]) -> ShardLoader:
    return ShardLoader(make(root, **setting), num_threads=2, prefetch=2)


def uninterrupted(root: Path, setting: dict[str, Any]) -> tuple[dict[int, list], dict[int, list[int]]]:
    """Every epoch's batches and shard ids, with GROWTH applied before each set_epoch."""
    make_cache(root)
    batches, shard_ids = {}, {}
    with loader_over(root, setting) as loader:
        for epoch in range(EPOCHS):
            if epoch in GROWTH:
                grow(root, GROWTH[epoch])
            shard_ids[epoch] = loader.set_epoch(epoch)
            batches[epoch] = take(loader)
    return batches, shard_ids


def resume_and_finish(root: Path, setting: dict[str, Any], state: dict[str, Any], grown: set[int],
                      ) -> tuple[list, dict[int, list], dict[int, list[int]]]:
    """A fresh dataset and loader: the rest of the interrupted epoch, then the following epochs with GROWTH."""
    with loader_over(root, setting) as loader:
        loader.load_state_dict(state)
        assert loader.epoch == STOP_EPOCH
        rest = take(loader)
        batches, shard_ids = {}, {}
        for epoch in range(STOP_EPOCH + 1, EPOCHS):
            if epoch in GROWTH and epoch not in grown:
                grow(root, GROWTH[epoch])
            shard_ids[epoch] = loader.set_epoch(epoch)
            batches[epoch] = take(loader)
    return rest, batches, shard_ids


def check_resumed(whole: tuple[dict, dict], stopped_after: int, rest: list, batches: dict, shard_ids: dict) -> None:
    want_batches, want_ids = whole
    assert 0 < stopped_after < len(want_batches[STOP_EPOCH]), "not a mid-epoch stop"
    assert_same_batches(rest, want_batches[STOP_EPOCH][stopped_after:], f"epoch {STOP_EPOCH} after the resume")
    for epoch in range(STOP_EPOCH + 1, EPOCHS):
        assert shard_ids[epoch] == want_ids[epoch], f"epoch {epoch} drew other shards"
        assert_same_batches(batches[epoch], want_batches[epoch], f"epoch {epoch}")


SETTINGS = {
    "whole-sequential": {"k": None},
    "random-interleave": {"k": 4, "sample_order": "interleave", "active_shards": 2},
    "permutation-sequential": {"k": 3, "policy": "permutation"},
    "permutation-interleave": {"k": 5, "policy": "permutation", "sample_order": "interleave", "active_shards": 3},
}


@pytest.mark.parametrize("setting", SETTINGS.values(), ids=SETTINGS.keys())
@pytest.mark.parametrize("grow_before_resume", [False, True])
@pytest.mark.slow
def test_a_run_stopped_mid_epoch_after_growth_resumes_bit_identically(tmp_path: Path, setting: dict[str, Any],
                                                                      grow_before_resume: bool) -> None:
    whole = uninterrupted(tmp_path / "whole", setting)
    for epoch in (1, 2):  # the growth joins (whole cache: in full at the next epoch); else nothing is tested
        joined = set(GROWTH[epoch]) & set().union(*(whole[1][e] for e in range(epoch, EPOCHS)))
        assert joined == set(GROWTH[epoch]) if setting["k"] is None else joined, (epoch, whole[1])
        assert setting["k"] is not None or set(GROWTH[epoch]) <= set(whole[1][epoch])
    root = make_cache(tmp_path / "run")
    stop_after = len(whole[0][STOP_EPOCH]) // 2
    with loader_over(root, setting) as loader:
        for epoch in range(STOP_EPOCH + 1):
            if epoch in GROWTH:
                grow(root, GROWTH[epoch])
            assert loader.set_epoch(epoch) == whole[1][epoch]
            first = take(loader, stop_after if epoch == STOP_EPOCH else None)
        state = json.loads(json.dumps(loader.state_dict()))  # what a checkpoint keeps: plain values
    assert_same_batches(first, whole[0][STOP_EPOCH][:stop_after], f"epoch {STOP_EPOCH} before the stop")
    assert state["samples_consumed"] == stop_after * BATCH and state["generation"] == 1
    grown = set()
    if grow_before_resume:  # more shards arrive while the run is down
        grow(root, GROWTH[STOP_EPOCH + 1])
        grown.add(STOP_EPOCH + 1)
    check_resumed(whole, stop_after, *resume_and_finish(root, setting, state, grown))


CHILD = DATA_SOURCE + textwrap.dedent('''
    import json, os, sys, time
    from pathlib import Path
    from shardstore import ShardStore, ShardWriter, build_manifest
    from shardstore.dataset.subset import RandomShardSubsetCachedDataset
    from shardstore.loader import ShardLoader

    root, state_file = Path(sys.argv[1]), Path(sys.argv[2])
    setting, growth, stop_epoch, kill_after = (json.loads(sys.argv[3]), json.loads(sys.argv[4]), int(sys.argv[5]),
                                               int(sys.argv[6]))
    k, policy = setting.pop("k"), setting.pop("policy", "random")
    ds = RandomShardSubsetCachedDataset(ShardStore.open(root), k, 5, policy, batch_size=4, refresh_manifest=True,
                                        **setting)
    loader = ShardLoader(ds, num_threads=2, prefetch=2)
    for epoch in range(stop_epoch + 1):
        for shard_id, rows in growth.get(str(epoch), {}).items():
            with ShardWriter(root, rows, start_shard=int(shard_id), num_shards=1, fsync=False) as w:
                w.add_batch(shard_arrays(int(shard_id), rows))
        if str(epoch) in growth:
            build_manifest(root)
        loader.set_epoch(epoch)
        for b, batch in enumerate(loader):
            if epoch < stop_epoch:
                continue
            tmp = state_file.with_name(state_file.name + ".tmp")
            tmp.write_text(json.dumps(loader.state_dict()))
            os.replace(tmp, state_file)  # a whole state or the previous one, wherever the kill lands
            if b + 1 == kill_after:
                print("state written", flush=True)
                time.sleep(600)  # waits here for SIGKILL
''')


@pytest.mark.slow
@pytest.mark.parametrize("grow_before_resume", [False, True])
def test_a_process_sigkilled_mid_epoch_after_growth_resumes_bit_identically(tmp_path: Path,
                                                                            grow_before_resume: bool) -> None:
    setting = SETTINGS["random-interleave"]
    whole = uninterrupted(tmp_path / "whole", setting)
    steps = len(whole[0][STOP_EPOCH])
    kill_after = random.randrange(1, steps)  # any batch but the last: the state must be mid-epoch
    root = make_cache(tmp_path / "run")
    state_file = tmp_path / "sampler.json"
    growth = {str(e): {str(i): n for i, n in shards.items()} for e, shards in GROWTH.items() if e <= STOP_EPOCH}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(root), str(state_file), json.dumps(setting),
                              json.dumps(growth), str(STOP_EPOCH), str(kill_after)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()
        assert line == "state written\n", f"the child ended early: {line!r} {child.stderr.read()}"
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=60) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    state = json.loads(state_file.read_text())
    assert state["epoch"] == STOP_EPOCH and state["samples_consumed"] == kill_after * BATCH, f"killed at {kill_after}"
    grown = set()
    if grow_before_resume:
        grow(root, GROWTH[STOP_EPOCH + 1])
        grown.add(STOP_EPOCH + 1)
    check_resumed(whole, kill_after, *resume_and_finish(root, setting, state, grown))


# -- 3. a snapshot that lost or changed shards; several ranks --------------------------------------------------------


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_a_snapshot_that_lost_a_shard_is_refused_naming_it(tmp_path: Path) -> None:
    root = make_cache(tmp_path / "cache")
    ds = make(root, 3)
    ds.set_epoch(0)
    grow(root, {6: 8})
    shutil.rmtree(root / "shard_000003")
    build_manifest(root)
    with pytest.raises(ManifestError, match=r"manifest\.json: 1 shard\(s\) this run reads are no longer in the "
                                            r"manifest \(ids 3\); .*shardstore build-manifest") as caught:
        ds.set_epoch(1)
    one_line(caught)


def test_a_shard_whose_sample_count_changed_is_refused_naming_it(tmp_path: Path) -> None:
    root = make_cache(tmp_path / "cache")
    ds = make(root, 3)
    ds.set_epoch(0)
    shutil.rmtree(root / "shard_000002")
    write_shards(root, {2: 3})  # shard 2 rewritten with 3 rows instead of 5
    build_manifest(root)
    with pytest.raises(ManifestError, match=r"shard 2 now has 3 samples, it had 5; shards of a growing cache may "
                                            r"not change") as caught:
        ds.set_epoch(1)
    one_line(caught)


def test_a_generation_newer_than_the_manifest_this_process_sees_is_an_error(tmp_path: Path) -> None:
    root = make_cache(tmp_path / "cache")
    ds = make(root, 3, rank=1, world_size=2)
    ds.set_epoch(0)
    g = ShardStore.open(root).generation
    with pytest.raises(ManifestError, match=rf"manifest\.json is at generation {g}, but generation {g + 1} was "
                                            r"asked for \(another rank or process saw a newer manifest\)") as caught:
        ds.set_epoch(1, generation=g + 1)
    one_line(caught)
    ds.set_epoch(1, generation=g)  # the generation it does see is fine


def global_sequence(ranks: list[RandomShardSubsetCachedDataset]) -> list[int]:
    """The ranks' batches interleaved step by step: the epoch's global read order."""
    b = ranks[0].batch_size
    parts = [r.indices() for r in ranks]
    return [int(x) for s in range(parts[0].size // b) for p in parts for x in p[s * b:(s + 1) * b]]


@pytest.mark.parametrize("policy", ["random", "permutation"])
def test_two_ranks_given_the_same_generation_plan_the_same_epoch(tmp_path: Path, policy: str) -> None:
    root = make_cache(tmp_path / "cache")
    rank0, rank1 = (make(root, 4, policy, rank=r, world_size=2, batch_size=2) for r in (0, 1))
    rank0.set_epoch(0)
    rank1.set_epoch(0)
    grow(root, {6: 8, 7: 8})
    g = ShardStore.open(root).generation
    shards = rank0.set_epoch(1)  # rank 0 reads the manifest at generation g and tells the others
    grow(root, {8: 8, 9: 8, 10: 8})  # rank 1 sees a newer manifest by the time it plans
    assert rank1.set_epoch(1, generation=g) == shards
    reference = make(ShardStore.open(root).subset(range(8)), 4, policy, refresh_manifest=False, batch_size=4)
    reference.set_epoch(1)  # one rank with the same global batch, on generation g's shards
    assert reference.selected_shards == shards
    assert global_sequence([rank0, rank1]) == reference.indices().tolist()
    # At the next epoch both take the generation rank 0 sees now, with the newest shards.
    g2 = ShardStore.open(root).generation
    assert rank0.set_epoch(2) == rank1.set_epoch(2, generation=g2)
    assert rank0.store.num_shards == rank1.store.num_shards == 11


def test_ranks_that_planned_one_generation_record_the_same_state(tmp_path: Path) -> None:
    root = make_cache(tmp_path / "cache")
    rank0, rank1 = (make(root, 4, rank=r, world_size=2, batch_size=2) for r in (0, 1))
    g = ShardStore.open(root).generation
    shards = rank0.set_epoch(0)
    grow(root, {6: 8})
    assert rank1.set_epoch(0, generation=g) == shards
    assert rank1.state_dict(steps_done=1) == rank0.state_dict(steps_done=1)
    assert rank1.state_dict()["generation"] == g


def test_a_rank_that_opened_the_cache_after_it_grew_plans_on_the_generation_given(tmp_path: Path) -> None:
    root = make_cache(tmp_path / "cache")
    rank0 = make(root, 4, rank=0, world_size=2, batch_size=2)
    g = ShardStore.open(root).generation
    shards = rank0.set_epoch(0)
    grow(root, {6: 8})
    rank1 = make(root, 4, rank=1, world_size=2, batch_size=2)  # a slower rank opens the cache after the growth
    assert rank1.set_epoch(0, generation=g) == shards


# -- 4. the shard policies over a growing cache --------------------------------------------------------------------


def test_permutation_over_a_grown_cache_never_repeats_within_an_epoch_and_covers_it_in_two_passes(
        tmp_path: Path) -> None:
    """What ``permutation`` does with shards that arrive mid-pass.

    The schedule is a function of the shard count N (``permutation_shards(N, k, seed, e)``):
    epoch ``e`` takes slots ``[e*k, (e+1)*k)`` of the seed's cycles of N slots. When the
    cache grows from N to N' at epoch ``g``, the walk goes on from epoch ``g`` over the grown
    cache's cycles (N' slots), at slot ``g*k``: the pass under way is not finished, so a shard
    read earlier in it may come again before one it had not reached. What holds: no shard twice
    within an epoch, and every shard of the grown cache, new ones included, within the
    ``2*ceil(N'/k)`` epochs from ``g`` on (that many epochs hold at least ``2*N'`` consecutive
    slots, so a whole cycle).
    """
    n0, k = 7, 3
    for growth_epoch, added in ((1, 4), (2, 6), (3, 1)):
        root = make_cache(tmp_path / f"g{growth_epoch}", {i: 4 for i in range(n0)})
        ds = make(root, k, "permutation")
        for epoch in range(growth_epoch):
            assert len(set(ds.set_epoch(epoch))) == k
        grow(root, {i: 4 for i in range(n0, n0 + added)})
        n1 = n0 + added
        window = 2 * math.ceil(n1 / k)
        seen: set[int] = set()
        for epoch in range(growth_epoch, growth_epoch + window):
            ids = ds.set_epoch(epoch)
            assert len(ids) == k == len(set(ids)), f"epoch {epoch} repeats a shard: {ids}"
            assert ids == [int(x) for x in permutation_shards(n1, k, 5, epoch)]  # ids are positions here
            seen |= set(ids)
        assert seen == set(range(n1)), f"growth at epoch {growth_epoch}: {sorted(set(range(n1)) - seen)} never read"


@pytest.mark.parametrize("n", [2, 5, 7, 12, 13, 31])
def test_every_window_of_two_passes_of_the_permutation_schedule_covers_every_shard(n: int) -> None:
    """The schedule behind the test above, at any epoch a growth may land on."""
    for k in sorted({1, 2, 3, 4, max(1, n // 2), max(1, n - 1), n}):
        window = 2 * math.ceil(n / k)
        epochs = [permutation_shards(n, k, 5, e) for e in range(2 * n + window)]
        for e in epochs:
            assert len(set(e.tolist())) == e.size == min(k, n)
        for start in range(2 * n):
            seen = set(np.concatenate(epochs[start:start + window]).tolist())
            assert seen == set(range(n)), (n, k, start)


@pytest.mark.slow
def test_random_draws_new_shards_with_probability_k_over_n_from_the_growth_on(tmp_path: Path) -> None:
    root = make_cache(tmp_path / "cache", {i: 4 for i in range(6)})
    k, growth_epoch, epochs = 3, 40, 400
    ds = make(root, k)
    before: Counter[int] = Counter()
    for epoch in range(growth_epoch):
        before.update(ds.set_epoch(epoch))
    assert set(before) == set(range(6))
    grow(root, {i: 4 for i in range(6, 10)})
    after: Counter[int] = Counter()
    for epoch in range(growth_epoch, growth_epoch + epochs):
        after.update(ds.set_epoch(epoch))
    p = k / 10
    mean, sd = epochs * p, math.sqrt(epochs * p * (1 - p))
    for shard_id in range(10):  # each shard, old or new, in about k/N of the epochs (5 standard deviations)
        assert abs(after[shard_id] - mean) < 5 * sd, (shard_id, after[shard_id], mean)
    # The draws from the growth on are those of a cache that always had 10 shards.
    fixed = make(root, k, refresh_manifest=False)
    assert all(ds.set_epoch(e) == fixed.set_epoch(e) for e in range(growth_epoch, growth_epoch + 20))


# -- 5. DataLoader workers follow the main process -----------------------------------------------------------------


def read_with_workers(loader: DataLoader) -> dict[str, torch.Tensor]:
    batches = list(loader)
    return {name: torch.cat([b[name] for b in batches]) for name in batches[0]}


def check_workers_read_the_grown_cache(root: Path, context: str) -> None:
    ds = make(root, None)
    loader = DataLoader(ds, batch_size=BATCH, num_workers=2, persistent_workers=True, multiprocessing_context=context)
    ds.set_epoch(0)
    got = read_with_workers(loader)  # the workers start here, on the first snapshot
    assert {int(g) // 1000 for g in got["gid"]} == set(INITIAL)
    for epoch, new in ((1, {6: 8, 7: 8}), (2, {8: 8})):
        grow(root, new)
        ds.set_epoch(epoch)
        got = read_with_workers(loader)
        want = expected(ds.store, ds.indices())
        assert set(new) <= {int(g) // 1000 for g in got["gid"]}
        for name in want:
            assert torch.equal(got[name], want[name]), f"epoch {epoch}: the workers read another epoch ({name})"


def test_persistent_forked_workers_read_the_grown_cache_after_set_epoch(tmp_path: Path) -> None:
    check_workers_read_the_grown_cache(make_cache(tmp_path / "cache"), "fork")


@pytest.mark.slow
def test_persistent_spawned_workers_read_the_grown_cache_after_set_epoch(tmp_path: Path) -> None:
    check_workers_read_the_grown_cache(make_cache(tmp_path / "cache"), "spawn")


def test_persistent_workers_follow_a_generation_older_than_the_manifest(tmp_path: Path) -> None:
    root = make_cache(tmp_path / "cache")
    ds = make(root, None)
    loader = DataLoader(ds, batch_size=BATCH, num_workers=2, persistent_workers=True)
    ds.set_epoch(0)
    read_with_workers(loader)
    g = ShardStore.open(root).generation
    grow(root, {6: 8})  # rank 0 planned epoch 1 on generation g; this process already sees g + 1
    assert sorted(ds.set_epoch(1, generation=g)) == sorted(INITIAL)
    got = read_with_workers(loader)
    assert torch.equal(got["gid"], expected(ds.store, ds.indices())["gid"])


# -- 6. the config key -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [True, False])
def test_refresh_manifest_comes_from_data_config(tmp_path: Path, value: bool) -> None:
    root = make_cache(tmp_path / "cache")
    cfg = tmp_path / "data_config.yaml"
    cfg.write_text(f"cache_root: {root}\nshards_per_epoch: null\nrefresh_manifest: {str(value).lower()}\n")
    ds = RandomShardSubsetCachedDataset.from_data_config(cfg, batch_size=BATCH)
    assert ds.refresh_manifest is value
    ds.set_epoch(0)
    grow(root, {6: 8})
    assert (6 in ds.set_epoch(1)) is value


def test_refresh_manifest_defaults_to_off_and_a_keyword_overrides_the_file(tmp_path: Path) -> None:
    root = make_cache(tmp_path / "cache")
    cfg = tmp_path / "data_config.yaml"
    cfg.write_text(f"cache_root: {root}\n")
    assert load_data_config(cfg).refresh_manifest is False
    assert RandomShardSubsetCachedDataset.from_data_config(cfg, batch_size=BATCH).refresh_manifest is False
    assert RandomShardSubsetCachedDataset.from_data_config(cfg, batch_size=BATCH,
                                                           refresh_manifest=True).refresh_manifest is True


def test_a_misspelled_refresh_manifest_is_one_line_with_a_suggestion(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    cfg = tmp_path / "data_config.yaml"
    cfg.write_text(f"cache_root: {tmp_path}\nrefresh_manifests: true\n")
    with pytest.raises(ConfigError, match=r"^unknown key `refresh_manifests` in .*data_config\.yaml; did you mean "
                                          r"`refresh_manifest`\?$") as caught:
        load_data_config(cfg)
    one_line(caught)
    with pytest.raises(ConfigError, match="did you mean `refresh_manifest`"):
        RandomShardSubsetCachedDataset.from_data_config(cfg)
    assert main(["train", "--data-config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did you mean `refresh_manifest`" in err[0], err
