"""Cached teacher targets: the stored views replay bit-exactly, fills survive SIGKILL and crashes mid-shard,
sparse targets round-trip, the consistency check catches corruption and replay bugs, and the CLI front end."""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

import shardstore.kd.teacher_cache as teacher_cache
import shardstore.kd.teacher_check as teacher_check
import shardstore.kd.trainer as trainer_module
import shardstore.store.groups as groups_module
from shardstore import ShardWriter
from shardstore.cli import main
from shardstore.config.resolve import DEFAULT_DATA_CONFIG, DEFAULT_MODEL_CONFIG, DEFAULT_TRAIN_CONFIG, load_run_config
from shardstore.errors import ConfigError, DiskFullError
from shardstore.kd.augment import apply_views
from shardstore.kd.cached_targets import CachedTargets
from shardstore.kd.target_spec import read_target_spec, shard_views
from shardstore.kd.targets import SparseLogits, encode_topk, teacher_log_probs
from shardstore.kd.teacher import load_teacher, render_teacher_input, teacher_forward
from shardstore.kd.teacher_cache import fill_teacher_cache
from shardstore.kd.teacher_check import check_teacher_cache
from shardstore.kd.trainer import train
from shardstore.manifest.build import build_manifest
from shardstore.store.groups import read_group_specs
from shardstore.store.reader import ShardStore

from .conftest import overrides, write_tiny_cache

REPO = Path(__file__).resolve().parents[2]
CONFIGS = [DEFAULT_DATA_CONFIG, DEFAULT_TRAIN_CONFIG, DEFAULT_MODEL_CONFIG]
SIZE = 16  # image side == teacher input size == student input size
VIEWS, TOPK = 3, 3  # the trained-teacher cache


def make_cfg(cache: Path, **extra):
    return load_run_config(*CONFIGS, overrides(cache.parent / f"run_{cache.name}", cache, **extra))


def trained(ckpt: Path, **extra) -> dict:
    """Overrides that make the trained net the teacher (and flip views, so replay must get flips right)."""
    return {"model__teacher__checkpoint": str(ckpt), "model__teacher__kwargs": {"width": 8},
            "train__augment__flip": True, **extra}


def group_arrays(root: Path, name: str) -> dict[tuple[int, str], np.ndarray]:
    """Every array of group ``name`` by (shard id, field), read through the manifest."""
    spec = read_target_spec(root, name)
    store = ShardStore.open(root)
    out = {}
    for p in store.manifest.positions_with(list(spec.field_names().values())):
        for f in spec.field_names().values():
            out[(store.shards[p].id, f)] = np.array(store.field(p, f))
    return out


def group_stats(root: Path, name: str) -> dict[Path, tuple[int, int]]:
    """(inode, mtime_ns) of every file of group ``name`` on disk."""
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(root.glob(f"shard_*/{name}_*.npy"))}


def recompute(cfg, root: Path, name: str) -> dict[int, dict[str, torch.Tensor]]:
    """The live teacher's float32 logits and features on every stored view, by shard id (no teacher_cache code)."""
    spec = read_target_spec(root, name)
    store = ShardStore.open(root)
    teacher = load_teacher(cfg, torch.device("cpu"))
    out = {}
    for p in store.manifest.positions_with([spec.field_names()["views"]]):
        entry = store.shards[p]
        images = torch.from_numpy(np.array(store.field(p, "images")))
        views = torch.from_numpy(np.array(store.field(p, spec.field_names()["views"])))
        n, k = views.shape[:2]
        with torch.no_grad():
            x = render_teacher_input(images.repeat_interleave(k, 0), views.reshape(n * k, 5), teacher)
            logits, feats = teacher_forward(teacher, x, features=True)
        out[entry.id] = {"logits": logits.view(n, k, -1), "features": feats.view(n, k, -1)}
    return out


def f16_close(stored: np.ndarray, exact: torch.Tensor) -> None:
    """``stored`` is ``exact`` rounded to float16: within half a float16 step (plus float32 noise of a rerun)."""
    exact_np = exact.double().numpy()
    half_ulp = np.spacing(np.abs(exact_np).astype(np.float16)).astype(np.float64) / 2
    err = np.abs(stored.astype(np.float64) - exact_np)
    finite = np.isfinite(exact_np)
    assert np.array_equal(np.isfinite(stored), finite)
    worst = float((err - half_ulp)[finite].max())
    assert worst <= 1e-5, f"stored values are off by {worst} more than float16 rounding"


def corrupt_views(root: Path, shard_id: int, box=(0, 0, 4, 4, 0), name: str = "teacher") -> None:
    """Overwrite one shard's stored views (every view a small corner crop) in place, then rebuild the manifest."""
    path = root / f"shard_{shard_id:06d}" / f"{name}_views.npy"
    views = np.load(path)
    bad = np.broadcast_to(np.array(box, dtype=views.dtype), views.shape).copy()
    np.save(path, bad)
    build_manifest(root)


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cnn_small (width 8) trained on labels alone, exported as a bare state dict (as shardstore.demo does)."""
    from shardstore.kd.checkpoint import CheckpointManager, load_checkpoint

    base = tmp_path_factory.mktemp("teacher")
    cache = write_tiny_cache(base / "cache")
    cfg = load_run_config(*CONFIGS, overrides(base / "run", cache, train__loss__alpha=0, train__epochs=4,
                                              train__lr=0.05, train__batch_size=32, train__eval__held_out_shards=0,
                                              data__shards_per_epoch=None, model__student__name="cnn_small",
                                              model__student__kwargs={"width": 8}))
    train(cfg)
    latest = CheckpointManager(base / "run").latest()
    state = load_checkpoint(latest)["student"]
    target = base / "teacher.pt"
    torch.save({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}, target)
    # the premise of the tests that need it: this teacher tells the classes apart
    teacher = load_teacher(make_cfg(cache, **trained(target)), torch.device("cpu"))
    store = ShardStore.open(cache)
    images = torch.from_numpy(np.concatenate([store.field(p, "images") for p in range(store.num_shards)]))
    labels = torch.from_numpy(np.concatenate([store.field(p, "labels") for p in range(store.num_shards)]))
    with torch.no_grad():
        accuracy = float((teacher(images.float() / 255).argmax(-1) == labels).float().mean())
    assert accuracy > 0.8, accuracy
    return target


@dataclass
class Filled:
    cache: Path
    ckpt: Path
    calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]  # render_teacher_input: images, views, out, size
    report: object

    def cfg(self, **extra):
        return make_cfg(self.cache, **trained(self.ckpt, **extra))


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory, teacher_ckpt: Path) -> Filled:
    """A tiny cache with the trained teacher's top-3 of 3 flipped views + embeddings ("teacher"), and dense
    logits of the same views ("dense"); every teacher input of the first fill is recorded."""
    cache = write_tiny_cache(tmp_path_factory.mktemp("filled") / "cache")
    calls = []
    real = teacher_cache.render_teacher_input

    def spy(images, views, teacher):
        x = real(images, views, teacher)
        calls.append((images.clone(), views.clone(), x.clone(), teacher.size))
        return x

    cfg = make_cfg(cache, **trained(teacher_ckpt))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(teacher_cache, "render_teacher_input", spy)
        # 48 // 3 views = 16 images per batch: two batches per shard
        report = fill_teacher_cache(cfg, views=VIEWS, topk=TOPK, embeddings=True, batch_size=48, fsync=False)
    fill_teacher_cache(cfg, name="dense", views=VIEWS, dense=True, fsync=False)
    return Filled(cache, teacher_ckpt, calls, report)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted fill with the seeded random teacher: 2 views, top-3."""
    cache = write_tiny_cache(tmp_path_factory.mktemp("reference") / "cache")
    report = fill_teacher_cache(make_cfg(cache), views=2, topk=3, fsync=False)
    assert report.shards_filled == list(range(8)) and report.images == 256
    return cache


# -- 1. bit-exact replay ---------------------------------------------------------------------


def test_fill_renders_the_teacher_input_from_exactly_the_stored_views(filled: Filled) -> None:
    assert filled.report.shards_filled == list(range(8))
    store = ShardStore.open(filled.cache)
    spec = read_target_spec(filled.cache, "teacher")
    assert all(size == SIZE for *_, size in filled.calls)
    rec_images = torch.cat([c[0] for c in filled.calls])
    rec_views = torch.cat([c[1] for c in filled.calls])
    rec_out = torch.cat([c[2] for c in filled.calls])
    at = 0
    for p, entry in enumerate(store.shards):
        n = entry.num_samples
        images = torch.from_numpy(np.array(store.field(p, "images")))
        on_disk = np.load(filled.cache / entry.field_path("teacher_views"))
        assert on_disk.dtype == np.int16 and on_disk.shape == (n, VIEWS, 5)
        assert np.array_equal(on_disk, store.field(p, "teacher_views"))
        # the seeded draw for (seed, shard id) is what was stored
        assert torch.equal(torch.from_numpy(on_disk).float(), shard_views(spec, entry.id, n))
        flat_images = images.repeat_interleave(VIEWS, 0)
        flat_views = torch.from_numpy(on_disk.astype(np.float32)).reshape(n * VIEWS, 5)
        assert torch.equal(rec_images[at : at + n * VIEWS], flat_images)  # the records line up with the samples
        assert torch.equal(rec_views[at : at + n * VIEWS].float(), flat_views)
        replay = apply_views(flat_images, flat_views, SIZE)
        assert torch.equal(replay, rec_out[at : at + n * VIEWS]), f"shard {entry.id}: replay differs"
        at += n * VIEWS
    assert at == rec_out.shape[0]  # nothing else was rendered
    per_shard = rec_views.view(store.num_shards, -1, 5)
    assert all(not torch.equal(per_shard[0], per_shard[i]) for i in range(1, store.num_shards))  # per shard id
    views = rec_views.float()
    # the views are real augmentations: flips both ways, boxes smaller than the image at several offsets
    assert 0.2 < views[:, 4].mean() < 0.8
    assert (views[:, 2] < SIZE).float().mean() > 0.5 and len(set(views[:, 1].tolist())) > 2
    assert not torch.equal(rec_out, apply_views(rec_images, torch.tensor([[0, 0, SIZE, SIZE, 0.0]]).expand(at, 5),
                                                SIZE))


def test_cached_targets_pick_a_stored_view_per_sample_from_the_step(filled: Filled) -> None:
    spec = read_target_spec(filled.cache, "teacher")
    store = ShardStore.open(filled.cache)
    p = 2
    batch = {f: torch.from_numpy(np.array(store.field(p, f))) for f in spec.field_names().values()}
    n = store.shards[p].num_samples
    rows = torch.arange(n)
    cached = CachedTargets(spec, 1234, temperature=2.0, tail="spread")
    which = cached.choose(n, 7)
    assert which.dtype == torch.int64 and 0 <= int(which.min()) and int(which.max()) < VIEWS
    assert len(set(which.tolist())) == VIEWS
    assert torch.equal(which, cached.choose(n, 7))  # same step, same choice
    assert not torch.equal(which, cached.choose(n, 8))  # another step, another choice
    assert not torch.equal(which, CachedTargets(spec, 4321, temperature=2.0, tail="spread").choose(n, 7))

    picked = cached.pick(batch, 7)
    views = batch["teacher_views"][rows, which]
    assert picked.views.dtype == torch.float32 and torch.equal(picked.views, views.float())
    sparse = SparseLogits(batch["teacher_topk_index"][rows, which], batch["teacher_topk_logp"][rows, which],
                          batch["teacher_tail_logp"][rows, which], spec.num_classes)
    assert torch.equal(picked.log_probs, teacher_log_probs(sparse, 2.0, "spread"))
    assert torch.equal(picked.features, batch["teacher_embedding"][rows, which].float())
    assert picked.logits is None
    again, other = cached.pick(batch, 7), cached.pick(batch, 8)
    assert torch.equal(again.views, picked.views) and torch.equal(again.log_probs, picked.log_probs)
    assert not torch.equal(other.views, picked.views)

    # the student's input for the picked view is bit for bit what the teacher saw for that (sample, view)
    images = torch.from_numpy(np.array(store.field(p, "images")))
    student_x = apply_views(images, picked.views, SIZE)
    teacher_x = torch.cat([c[2] for c in filled.calls]).view(-1, VIEWS, 3, SIZE, SIZE)
    first = sum(s.num_samples for s in store.shards[:p])
    assert torch.equal(student_x, teacher_x[first + rows, which])


def test_trainer_feeds_the_student_the_replayed_stored_view(filled: Filled, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    store = ShardStore.open(filled.cache)
    where = {}  # image bytes -> (shard position, row)
    for p in range(store.num_shards):
        for row, image in enumerate(np.array(store.field(p, "images"))):
            where[image.tobytes()] = (p, row)
    picks, renders = [], []
    real_pick, real_apply = CachedTargets.pick, trainer_module.apply_views

    def spy_pick(self, batch, step):
        picked = real_pick(self, batch, step)
        n = batch[self.names["views"]].shape[0]
        picks.append((batch[self.names["views"]].clone(), self.choose(n, step), picked.views.clone()))
        return picked

    def spy_apply(images, views, size):
        x = real_apply(images, views, size)
        renders.append((images.clone(), views.clone(), size, x.clone()))
        return x

    monkeypatch.setattr(CachedTargets, "pick", spy_pick)
    monkeypatch.setattr(trainer_module, "apply_views", spy_apply)
    cfg = load_run_config(*CONFIGS, overrides(tmp_path / "student", filled.cache, **trained(
        filled.ckpt, data__teacher_targets="teacher", train__epochs=1, train__max_steps_per_epoch=3,
        train__eval__every_epochs=0)))
    result = train(cfg)
    assert result.global_step == 3
    assert len(picks) == len(renders) == 3
    for (batch_views, which, picked), (images, views, size, x) in zip(picks, renders):
        rows = torch.arange(images.shape[0])
        assert size == SIZE and torch.equal(views, picked)
        assert torch.equal(picked, batch_views[rows, which].float())
        # each sample's view is view which[j] stored for that very sample (found on disk by its pixels)
        assert torch.equal(views, stored_views_of(store, where, images, which))
        assert torch.equal(x, apply_views(images, views, SIZE))


def stored_views_of(store: ShardStore, where: dict, images: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
    out = []
    for j in range(images.shape[0]):
        p, row = where[images[j].numpy().tobytes()]
        out.append(torch.from_numpy(np.array(store.field(p, "teacher_views")[row, int(which[j])])).float())
    return torch.stack(out)


# -- 2. a killed or crashed fill resumes --------------------------------------------------------

KILLER = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import torch
torch.set_num_threads({threads})  # the same float results as the fills in the test process
from shardstore.config.resolve import load_run_config
from shardstore.kd.teacher_cache import fill_teacher_cache

written = []
def on_shard(shard_id):
    written.append(shard_id)
    if len(written) == 3:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no manifest rebuild: like a node failure

fill_teacher_cache(load_run_config(*{configs!r}, {overrides!r}), views=2, topk=3, fsync=False, on_shard=on_shard)
"""


@pytest.mark.slow
def test_a_killed_fill_resumes_without_touching_finished_shards(reference: Path, tmp_path: Path) -> None:
    cache = write_tiny_cache(tmp_path / "cache")
    script = KILLER.format(repo=str(REPO), threads=torch.get_num_threads(), configs=[str(c) for c in CONFIGS],
                           overrides=overrides(tmp_path / "run", cache))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    finished = group_stats(cache, "teacher")
    assert {p.parent.name for p in finished} == {f"shard_{i:06d}" for i in range(3)}
    assert len(finished) == 3 * 4
    assert not [p for p in cache.rglob("*") if ".tmp-" in p.name]

    report = fill_teacher_cache(make_cfg(cache), views=2, topk=3, fsync=False)
    assert report.shards_filled == [3, 4, 5, 6, 7]
    assert report.shards_present == 3 and report.images == 5 * 32
    after = group_stats(cache, "teacher")
    assert {p: after[p] for p in finished} == finished  # neither rewritten nor replaced
    assert len(after) == 8 * 4
    manifest = build_manifest(cache, write=False).manifest
    fields = list(read_target_spec(cache, "teacher").field_names().values())
    assert manifest.positions_with(fields).tolist() == list(range(8))
    assert set(fields) <= set(ShardStore.open(cache).fields)  # every shard has the group
    got, want = group_arrays(cache, "teacher"), group_arrays(reference, "teacher")
    assert got.keys() == want.keys() and len(got) == 8 * 4
    for key in want:
        assert got[key].dtype == want[key].dtype and np.array_equal(got[key], want[key]), key


def test_a_crash_between_renames_leaves_the_shard_incomplete_and_it_is_rewritten(
        reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = write_tiny_cache(tmp_path / "cache")
    renames = []

    class FlakyOs:
        """``os`` for shardstore.store.groups only: the second rename into shard 3 fails."""

        def __getattr__(self, name):
            return getattr(os, name)

        @staticmethod
        def replace(src, dst):
            if Path(dst).parent.name == "shard_000003":
                renames.append(Path(dst).name)
                if len(renames) == 2:
                    raise OSError(28, "No space left on device")
            return os.replace(src, dst)

    monkeypatch.setattr(groups_module, "os", FlakyOs())
    cfg = make_cfg(cache)
    with pytest.raises(DiskFullError, match=r"no space left on device: renaming .*shard_000003/teacher_topk_index\.npy "
                                            r"into place; the shard now lacks this group \(the next run writes it"):
        fill_teacher_cache(cfg, views=2, topk=3, fsync=False)
    monkeypatch.undo()
    shard3 = cache / "shard_000003"
    assert renames == ["teacher_views.npy", "teacher_topk_index.npy"]
    assert sorted(p.name for p in shard3.glob("teacher_*")) == ["teacher_views.npy"]  # one whole file, no temps
    assert not [p for p in shard3.iterdir() if p.name.startswith(".")]
    fields = list(read_target_spec(cache, "teacher").field_names().values())
    built = build_manifest(cache)
    assert built.manifest.positions_with(fields).tolist() == [0, 1, 2]
    assert [p.shard_id for p in built.incomplete_groups] == [3]
    assert "teacher_topk_index" in str(built.incomplete_groups[0])
    assert len(built.manifest.shards) == 8  # the shard itself stays in the cache

    before = group_stats(cache, "teacher")
    report = fill_teacher_cache(cfg, views=2, topk=3, fsync=False)
    assert report.shards_filled == [3, 4, 5, 6, 7] and report.shards_present == 3
    after = group_stats(cache, "teacher")
    assert all(after[p] == before[p] for p in before if p.parent.name in {"shard_000000", "shard_000001",
                                                                         "shard_000002"})
    assert build_manifest(cache).incomplete_groups == []
    got, want = group_arrays(cache, "teacher"), group_arrays(reference, "teacher")
    assert got.keys() == want.keys()
    for key in want:
        assert np.array_equal(got[key], want[key]), key


# -- 3. sparse and dense targets on disk -------------------------------------------------------


def test_stored_topk_targets_are_the_encoded_teacher_logits(filled: Filled) -> None:
    cfg = filled.cfg()
    spec = read_target_spec(filled.cache, "teacher")
    assert (spec.views, spec.topk, spec.logits, spec.num_classes) == (VIEWS, TOPK, "topk", 10)
    assert spec.embedding_dim > 0
    live = recompute(cfg, filled.cache, "teacher")
    arrays = group_arrays(filled.cache, "teacher")
    kls = []
    for shard_id, out in live.items():
        logits = out["logits"]
        index = arrays[(shard_id, "teacher_topk_index")]
        logp = arrays[(shard_id, "teacher_topk_logp")]
        tail = arrays[(shard_id, "teacher_tail_logp")]
        assert index.dtype == np.int16 and logp.dtype == np.float16 and tail.dtype == np.float16
        assert index.shape == logp.shape == (32, VIEWS, TOPK) and tail.shape == (32, VIEWS)
        encoded = encode_topk(logits, TOPK)
        assert np.array_equal(index, encoded.indices.numpy())
        # against the float32 truth: the stored values are it rounded to float16
        all_log_p = torch.log_softmax(logits, -1)
        true_top, true_index = torch.topk(all_log_p, TOPK, dim=-1)
        assert np.array_equal(index, true_index.numpy())
        f16_close(logp, true_top)
        f16_close(tail, torch.logsumexp(all_log_p.scatter(-1, true_index, float("-inf")), -1))
        f16_close(arrays[(shard_id, "teacher_embedding")], out["features"])
        rebuilt = teacher_log_probs(SparseLogits(torch.from_numpy(index), torch.from_numpy(logp),
                                                 torch.from_numpy(tail), 10), 1.0, "spread")
        assert torch.allclose(rebuilt.exp().sum(-1), torch.ones(()), atol=1e-5)
        # the kept classes come back with their own probabilities, the tail with its total mass
        assert float((rebuilt.gather(-1, true_index) - true_top).abs().max()) < 5e-3
        tail_mass = all_log_p.exp().scatter(-1, true_index, 0.0).sum(-1)
        assert float((rebuilt.exp().scatter(-1, true_index, 0.0).sum(-1) - tail_mass).abs().max()) < 5e-3
        # KL(dense || rebuilt): what spreading the tail evenly costs (at most r log(C - k)), plus float16 rounding
        kl = (all_log_p.exp() * (all_log_p - rebuilt)).sum(-1)
        ideal = teacher_log_probs(SparseLogits(true_index, true_top, all_log_p.exp().scatter(-1, true_index, 0.0)
                                               .sum(-1).log(), 10), 1.0, "spread")
        kl_ideal = (all_log_p.exp() * (all_log_p - ideal)).sum(-1)
        assert float((kl - kl_ideal).abs().max()) < 2e-3
        assert bool((kl <= tail_mass * math.log(10 - TOPK) + 2e-3).all())
        kls.append(kl.flatten())
    kl = torch.cat(kls)
    assert kl.numel() == 256 * VIEWS and float(kl.min()) >= -1e-3


def test_dense_targets_are_the_teacher_logits_in_float16(filled: Filled) -> None:
    spec = read_target_spec(filled.cache, "dense")
    assert spec.logits == "dense" and spec.topk == 0 and spec.embedding_dim == 0
    live = recompute(filled.cfg(), filled.cache, "dense")
    arrays = group_arrays(filled.cache, "dense")
    assert {f for _, f in arrays} == {"dense_views", "dense_logits"}
    for shard_id, out in live.items():
        stored = arrays[(shard_id, "dense_logits")]
        assert stored.dtype == np.float16 and stored.shape == (32, VIEWS, 10)
        f16_close(stored, out["logits"])
        # views depend on (seed, shard id) alone: the two groups drew the same ones
        assert np.array_equal(arrays[(shard_id, "dense_views")],
                              np.load(filled.cache / f"shard_{shard_id:06d}" / "teacher_views.npy"))


# -- 4. the consistency check --------------------------------------------------------------------


def test_check_passes_on_a_fresh_fill(filled: Filled) -> None:
    report = check_teacher_cache(filled.cfg(), samples=10_000)
    assert report.passed, report.failures
    assert report.checked == 256 and report.views_not_redrawn == 0
    assert report.top1_match == 1.0
    assert report.worst_kl is not None and report.worst_kl < 1e-4
    assert report.worst_cosine is not None and report.worst_cosine > 0.999
    assert report.teacher_differs is None
    dense = check_teacher_cache(filled.cfg(), name="dense", samples=64, seed=3)
    assert dense.passed and dense.checked == 64 and dense.top1_match == 1.0 and dense.worst_kl < 1e-4
    assert dense.worst_cosine is None


def test_check_fails_on_corrupted_crop_boxes(filled: Filled, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(filled.cache, cache)
    corrupt_views(cache, 5)
    cfg = make_cfg(cache, **trained(filled.ckpt))
    report = check_teacher_cache(cfg, samples=10_000)
    assert not report.passed
    assert report.checked == 256 and report.views_not_redrawn == 32  # exactly the samples of shard 5
    assert report.top1_match < 0.99 and report.worst_kl > 1e-2
    text = " ".join(report.failures)
    assert "32 of 256 stored views differ" in text and "top-1" in text and "worst KL" in text
    assert "embedding cosine" in text
    # only shard 5 can disagree: on its corner crops the live teacher misses more than a quarter of its top-1s
    assert (1 - report.top1_match) * 256 > 8


@pytest.mark.parametrize("bug", ["flip", "shift"])
def test_check_fails_when_the_replay_renders_other_pixels(filled: Filled, monkeypatch: pytest.MonkeyPatch,
                                                         bug: str) -> None:
    real = teacher_check.render_teacher_input

    def buggy(images, views, teacher):
        if bug == "flip":
            return real(images, views, teacher).flip(-1)
        shifted = views.clone()
        shifted[:, 1] += 3  # the box three pixels to the right
        return real(images, shifted, teacher)

    monkeypatch.setattr(teacher_check, "render_teacher_input", buggy)
    report = check_teacher_cache(filled.cfg(), samples=10_000)
    assert not report.passed
    assert report.views_not_redrawn == 0  # the stored views are fine, the replay is not
    assert report.top1_match < 0.99 and report.worst_kl > 1e-2, (report.top1_match, report.worst_kl)


# -- 5. settings guard --------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "extra", "message"), [
    ({"views": 4}, {}, "views=3, this run has 4"),
    ({"topk": 5}, {}, "topk=3, this run has 5"),
    ({"seed": 1}, {}, "seed=0, this run has 1"),
    ({"embeddings": False}, {}, "embedding_dim="),
    ({"dense": True}, {}, "logits='topk', this run has 'dense'"),
    ({}, {"train__augment__flip": False}, "augment="),
    ({}, {"train__augment__scale": [0.3, 1.0]}, "augment="),
    ({}, {"model__teacher__checkpoint": None}, "teacher.checkpoint_sha256="),
])
def test_a_refill_with_other_settings_is_refused(filled: Filled, kwargs: dict, extra: dict, message: str) -> None:
    declaration = filled.cache / "teacher.fields.json"
    before = {**group_stats(filled.cache, "teacher"), declaration: (declaration.stat().st_ino,
                                                                    declaration.stat().st_mtime_ns)}
    args = {"views": VIEWS, "topk": TOPK, "embeddings": True, **kwargs}
    with pytest.raises(ConfigError, match="use another --name") as exc:
        fill_teacher_cache(filled.cfg(**extra), fsync=False, **args)
    assert message in str(exc.value) and "teacher.fields.json holds targets made with" in str(exc.value)
    after = {**group_stats(filled.cache, "teacher"), declaration: (declaration.stat().st_ino,
                                                                   declaration.stat().st_mtime_ns)}
    assert after == before  # nothing was written


def test_the_same_settings_fill_nothing_and_another_name_adds_a_group(filled: Filled, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(filled.cache, cache)
    cfg = make_cfg(cache, **trained(filled.ckpt))
    before = group_stats(cache, "teacher")
    same = fill_teacher_cache(cfg, views=VIEWS, topk=TOPK, embeddings=True, fsync=False)
    assert same.shards_filled == [] and same.shards_present == 8 and same.images == 0
    other = fill_teacher_cache(cfg, name="second", views=2, topk=5, seed=9, fsync=False)
    assert other.shards_filled == list(range(8)) and other.shards_present == 0
    assert group_stats(cache, "teacher") == before
    assert set(read_group_specs(cache)) == {"teacher", "dense", "second"}
    store = ShardStore.open(cache)
    for name in ("teacher", "dense", "second"):
        spec = read_target_spec(cache, name)
        for f in spec.field_names().values():
            assert store.fields[f].group == name
        assert store.manifest.positions_with(list(spec.field_names().values())).tolist() == list(range(8))
    second = read_target_spec(cache, "second")
    assert (second.views, second.topk, second.seed) == (2, 5, 9)
    assert np.array_equal(np.array(store.field(0, "second_views")), shard_views(second, 0, 32).numpy())
    assert not np.array_equal(np.array(store.field(0, "second_views"))[:, :2],
                              np.array(store.field(0, "teacher_views"))[:, :2])  # another seed, other views
    assert check_teacher_cache(cfg, name="second", samples=32).passed
    assert main(["info", str(cache)]) == 0
    out = capsys.readouterr().out
    for f in ("teacher_views", "teacher_topk_index", "dense_logits", "second_views", "second_tail_logp"):
        assert f in out
    assert "group teacher" in out and "group dense" in out and "group second" in out


def test_overwrite_replaces_only_the_named_group(reference: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(reference, cache)
    cfg = make_cfg(cache)
    fill_teacher_cache(cfg, name="keep", views=1, topk=2, fsync=False)
    old, kept = group_stats(cache, "teacher"), group_stats(cache, "keep")
    with pytest.raises(ConfigError, match="views=2, this run has 3"):
        fill_teacher_cache(cfg, views=3, topk=4, fsync=False)
    report = fill_teacher_cache(cfg, views=3, topk=4, fsync=False, overwrite=True)
    assert report.shards_filled == list(range(8)) and report.shards_present == 0
    spec = read_target_spec(cache, "teacher")
    assert (spec.views, spec.topk) == (3, 4)
    new = group_stats(cache, "teacher")
    assert new.keys() == old.keys() and all(new[p] != old[p] for p in old)  # every file written anew
    assert group_stats(cache, "keep") == kept
    arrays = group_arrays(cache, "teacher")
    assert len(arrays) == 8 * 4 and arrays[(0, "teacher_topk_index")].shape == (32, 3, 4)
    assert check_teacher_cache(cfg, samples=64).passed and check_teacher_cache(cfg, name="keep", samples=64).passed


# -- 6. a growing cache --------------------------------------------------------------------------


def test_shards_added_after_a_fill_are_the_only_ones_filled_next(reference: Path, tmp_path: Path) -> None:
    cache = write_tiny_cache(tmp_path / "cache")
    for i in (6, 7):
        shutil.rmtree(cache / f"shard_{i:06d}")
    build_manifest(cache)
    cfg = make_cfg(cache)
    first = fill_teacher_cache(cfg, views=2, topk=3, fsync=False)
    assert first.shards_filled == list(range(6))
    before = group_stats(cache, "teacher")
    ref = ShardStore.open(reference)
    # reference shards 6 and 7 arrive as shards 8 and 9 (ids need not be contiguous)
    with ShardWriter(cache, 32, start_shard=8, fsync=False) as w:
        w.add_batch({f: np.concatenate([np.array(ref.field(p, f)) for p in (6, 7)]) for f in ("images", "labels")})
    # no build_manifest here: the fill picks up the new shards itself
    report = fill_teacher_cache(cfg, views=2, topk=3, fsync=False)
    assert report.shards_filled == [8, 9] and report.shards_present == 6 and report.images == 64
    after = group_stats(cache, "teacher")
    assert {p: after[p] for p in before} == before and len(after) == 8 * 4
    got, want = group_arrays(cache, "teacher"), group_arrays(reference, "teacher")
    assert {i for i, _ in got} == {0, 1, 2, 3, 4, 5, 8, 9}
    for (i, f), arr in want.items():
        if i < 6:
            assert np.array_equal(got[(i, f)], arr), (i, f)
    spec = read_target_spec(cache, "teacher")
    live = recompute(cfg, cache, "teacher")
    for i in (8, 9):
        views = got[(i, "teacher_views")]
        assert np.array_equal(views, shard_views(spec, i, 32).numpy())  # drawn for the shard's id, not position
        assert not np.array_equal(views, want[(i - 2, "teacher_views")])
        assert np.array_equal(got[(i, "teacher_topk_index")], encode_topk(live[i]["logits"], 3).indices.numpy())
        f16_close(got[(i, "teacher_topk_logp")], torch.topk(torch.log_softmax(live[i]["logits"], -1), 3).values)


# -- 7. the command line -------------------------------------------------------------------------


@pytest.mark.slow
def test_cache_teacher_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cache = write_tiny_cache(tmp_path / "cache")
    sets = [a for o in overrides(tmp_path / "run", cache) for a in ("--set", o)]
    assert "model.teacher.checkpoint=null" in sets

    def run(*args: str) -> tuple[int, str, str]:
        code = main(["cache-teacher", *sets, "--device", "cpu", *args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    code, out, err = run("--views", "2", "--topk", "3")
    assert code == 0, err
    assert "filled 8 shard(s) (256 images x 2 views" in out and "0 already had them" in out
    assert "top-3 of 10 classes" in out and "data.teacher_targets=teacher" in out
    code, out, _ = run("--views", "2", "--topk", "3")
    assert code == 0 and "filled 0 shard(s)" in out and "8 already had them" in out

    code, out, err = run("--check", "20")
    assert code == 0, err
    assert "20 stored views of 'teacher' recomputed" in out and "check passed" in out and "FAILED" not in err

    assert main(["info", str(cache)]) == 0
    out = capsys.readouterr().out
    for f in ("teacher_views", "teacher_topk_index", "teacher_topk_logp", "teacher_tail_logp", "group teacher"):
        assert f in out
    assert "group teacher (teacher.fields.json): name=teacher, views=2, logits=topk, topk=3" in out

    for args, message in [(["--name", "nope", "--check", "5"], "has no teacher targets named 'nope'"),
                          (["--views", "3", "--topk", "3"], "views=2, this run has 3"),
                          (["--name", "other", "--views", "0"], "--views must be at least 1"),
                          (["--name", "other", "--topk", "11"], "--topk must be between 1 and the 10 classes")]:
        code, out, err = run(*args)
        assert code == 2, (args, out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("shardstore: error: ") and message in lines[0], err
        assert "Traceback" not in out + err

    corrupt_views(cache, 2)
    code, out, err = run("--check", "1000")
    assert code == 1
    assert "FAILED" in err and "32 of 256 stored views differ" in err and "do not train from them" in err
    assert "check passed" not in out

    # --overwrite writes the targets again from scratch, and the check passes again
    code, out, err = run("--views", "2", "--topk", "3", "--overwrite")
    assert code == 0 and "filled 8 shard(s)" in out, err
    code, out, err = run("--check", "1000")
    assert code == 0 and "check passed" in out and "256 of 256" in out, err


def test_the_same_teacher_at_another_path_is_the_same_teacher(filled: Filled, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(filled.cache, cache)
    copy = tmp_path / "moved_teacher.pt"
    shutil.copyfile(filled.ckpt, copy)
    cfg = make_cfg(cache, **trained(copy))
    report = fill_teacher_cache(cfg, views=VIEWS, topk=TOPK, embeddings=True, fsync=False)
    assert report.shards_filled == [] and report.shards_present == 8  # known by its content, not its path
    check = check_teacher_cache(cfg, samples=16)
    assert check.passed and check.teacher_differs is None


def test_cli_fills_a_cache_that_has_no_manifest_yet(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cache = tmp_path / "cache"
    write_tiny_cache(cache)
    (cache / "manifest.json").unlink()  # shards written, manifest never built
    sets = [a for o in overrides(tmp_path / "run", cache) for a in ("--set", o)]
    code = main(["cache-teacher", *sets, "--device", "cpu", "--views", "1", "--topk", "2"])
    assert code == 0, capsys.readouterr().err
    assert "filled 8 shard(s)" in capsys.readouterr().out


def test_a_flat_cache_gets_its_targets_as_flat_files_and_trains_from_them(tmp_path: Path) -> None:
    """np.save-style caches (<field>_<id>.npy in the root) get <name>_<field>_<id>.npy files, same digits."""
    native = write_tiny_cache(tmp_path / "native", num_shards=6)
    flat = tmp_path / "flat"
    flat.mkdir()
    store = ShardStore.open(native)
    for p in range(store.num_shards):
        for field_name in ("images", "labels"):
            np.save(flat / f"{field_name}_{p:04d}.npy", np.array(store.field(p, field_name)))
    report = fill_teacher_cache(make_cfg(flat), views=2, topk=3, fsync=False)
    assert report.shards_filled == list(range(6))
    assert (flat / "teacher_views_0003.npy").exists()
    assert not any(p.is_dir() for p in flat.iterdir() if p.name != "manifest.d")  # no shard directory made
    result = train(make_cfg(flat, train__epochs=1, data__teacher_targets="teacher",
                            model__teacher__name="no_such_model"))
    assert result.global_step > 0
