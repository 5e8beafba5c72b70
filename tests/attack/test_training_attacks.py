"""Training met by a hostile or unlucky user: a cache changed under its manifest, odd thread counts, a hostile
run directory (lock file, recorded config), and signals at awkward moments. Each case ends in one honest line."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from shardstore.errors import CorruptShardError
from shardstore.kd import threads
from shardstore.kd.images import ImageFormat
from shardstore.kd.threads import configure_threads

from . import harness


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return harness.tiny_cache(tmp_path_factory.mktemp("train-attacks") / "cache")


# -- torch threads ----------------------------------------------------------------------------


def test_threads_above_the_cpus_are_lowered(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """train.threads: 100000 made OpenMP fail to start its threads and the process crash (SIGSEGV) at the first op."""
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "available_cpus", lambda: 2)
    try:
        with caplog.at_level(logging.WARNING, logger="shardstore.kd.threads"):
            assert configure_threads(100_000, 1) == 2
        assert torch.get_num_threads() == 2
        assert "train.threads is 100000, more than the 2 CPU(s)" in caplog.text
        monkeypatch.setenv("OMP_NUM_THREADS", "100000")
        assert configure_threads(None, 1) == 2
        assert "OMP_NUM_THREADS is 100000" in caplog.text
    finally:
        torch.set_num_threads(before)


# -- labels the manifest does not know of -------------------------------------------------------


def test_batch_labels_outside_the_classes_are_refused_on_cpu() -> None:
    fmt = ImageFormat(num_classes=10)
    assert torch.equal(fmt.labels(torch.tensor([[0], [9], [-1]])), torch.tensor([0, 9, -1]))
    for bad in (452, 10, -2):
        with pytest.raises(CorruptShardError, match=f"holds the label {bad} outside 0..9") as info:
            fmt.labels(torch.tensor([3, bad, 1]))
        assert "\n" not in str(info.value) and "build-manifest --full" in str(info.value)
    assert torch.equal(ImageFormat().labels(torch.tensor([452])), torch.tensor([452]))  # unchecked: num_classes 0


def test_gpu_path_masks_bad_labels_and_reports_them_later() -> None:
    """On a GPU the step must not wait: bad labels become -1 (no device-side assert) and a flag raises later."""
    fmt = ImageFormat(num_classes=10)
    y = torch.tensor([1, 2, 3])
    assert torch.equal(fmt._mask_labels(y, (y < -1) | (y >= 10)), y)
    fmt.check_seen_labels()  # nothing seen
    y = torch.tensor([1, 452, 3])
    assert torch.equal(fmt._mask_labels(y, (y < -1) | (y >= 10)), torch.tensor([1, -1, 3]))
    y = torch.tensor([4])
    fmt._mask_labels(y, (y < -1) | (y >= 10))  # a later good batch does not clear the flag
    with pytest.raises(CorruptShardError, match="held a label outside 0..9"):
        fmt.check_seen_labels()


def _rewrite_keeping_stat(path: Path, array: np.ndarray) -> None:
    """Rewrite a .npy in place with the same size and mtime (what a hand-edited manifest amounts to)."""
    st = path.stat()
    np.save(path, array)
    assert path.stat().st_size == st.st_size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.slow
def test_label_out_of_range_behind_the_manifest_is_one_line(cache: Path, tmp_path: Path) -> None:
    """A label file changed with its size and mtime kept (or a manifest edited by hand): was `IndexError: Target
    452 is out of bounds` with a traceback."""
    import shutil

    root = tmp_path / "cache"
    shutil.copytree(cache, root)
    from shardstore.store.reader import load_manifest
    from tests.manifest.synthetic import replace_column

    manifest = load_manifest(root)
    for name in manifest.fields:  # the copy may have new mtimes: record them in the table so nothing looks changed
        mtimes = [(root / manifest.file_path(p, name)).stat().st_mtime_ns for p in range(manifest.num_shards)]
        replace_column(root, f"{name}.mtime_ns", np.array(mtimes, np.int64))
    labels_path = root / "shard_000002" / "labels.npy"
    labels = np.load(labels_path)
    labels[3] = 452
    _rewrite_keeping_stat(labels_path, labels)
    outcome = harness.cli("train", *harness.run_sets(tmp_path / "run", root, data__shards_per_epoch=5))
    harness.assert_one_line_error(outcome, "holds the label 452", "build-manifest --full")


# -- the run directory's lock file ------------------------------------------------------------


def test_lock_file_planted_as_a_hard_link_leaves_its_target_whole(tmp_path: Path) -> None:
    """RUN_DIR/.lock hard-linked to a file elsewhere: taking the lock emptied that file (the holder's record)."""
    from shardstore.errors import ConfigError
    from shardstore.kd.lock import RunDirLock

    victim = tmp_path / "notes.txt"
    victim.write_text("a week of results\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    os.link(victim, run_dir / ".lock")
    with pytest.raises(ConfigError, match="lock file is a hard link to another file; remove it") as info:
        RunDirLock(run_dir).acquire()
    assert "\n" not in str(info.value)
    assert victim.read_text() == "a week of results\n"


@pytest.mark.parametrize("kind", ["symlink", "directory", "fifo"])
def test_lock_file_that_is_not_a_plain_file_is_one_line(tmp_path: Path, kind: str) -> None:
    from shardstore.errors import ConfigError
    from shardstore.kd.lock import RunDirLock

    target = tmp_path / "target"
    target.write_text("keep\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lock = run_dir / ".lock"
    {"symlink": lambda: lock.symlink_to(target), "directory": lock.mkdir, "fifo": lambda: os.mkfifo(lock)}[kind]()
    with pytest.raises(ConfigError, match=r"\.lock") as info:
        RunDirLock(run_dir).acquire()
    assert "\n" not in str(info.value) and target.read_text() == "keep\n"


def test_lock_file_holding_garbage_is_taken_over(tmp_path: Path) -> None:
    from shardstore.kd.lock import RunDirLock

    (tmp_path / ".lock").write_bytes(b"\x00\xff not json {" * 1000)
    with RunDirLock(tmp_path) as lock:
        assert lock.held
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert (tmp_path / ".lock").read_bytes() == b""


# -- what --resume compares with ------------------------------------------------------------------


@pytest.fixture
def run_cfg(cache: Path, tmp_path: Path):
    from shardstore.config.resolve import (
        DEFAULT_DATA_CONFIG,
        DEFAULT_MODEL_CONFIG,
        DEFAULT_TRAIN_CONFIG,
        load_run_config,
    )
    from tests.kd.conftest import overrides

    return load_run_config(DEFAULT_DATA_CONFIG, DEFAULT_TRAIN_CONFIG, DEFAULT_MODEL_CONFIG,
                           overrides(tmp_path / "run", cache, **harness.TINY_RUN))


def _state(cfg, **extra):
    from shardstore.config.resolve import run_config_to_yaml

    return {"config": run_config_to_yaml(cfg), "epoch": 0, "epoch_complete": True, "global_step": 6,
            "sampler": {"global_batch": cfg.train.batch_size, "samples_consumed": 48}, **extra}


def test_values_in_a_refusal_are_one_short_line() -> None:
    from shardstore.kd.run_changes import SHOW_CHARS, show

    assert show("cnn_small") == "cnn_small" and show({"width": 4}) == "{width: 4}" and show(None) == "null"
    for value in ("adamw\nevil", "x" * 100_000, list(range(100_000)), {"k": "a\x1b[31mred"}):
        text = show(value)
        assert "\n" not in text and text.isprintable() and len(text) <= SHOW_CHARS, (value if len(str(value)) < 50
                                                                                      else text)


@pytest.mark.parametrize("record", [
    "a: &a [x, x]\nb: [*a, *a]\n",  # aliases (the bomb's building block)
    "!!python/object/apply:os.system ['echo pwned']",
    "[1, 2]",
    "train: 5\nmodel: x\n",
    "model: {num_classes: [" + ",".join(["1"] * 40_000) + "]}\n",  # 80 KB: seconds of parsing
])
def test_an_unreadable_recorded_config_is_a_warning_not_a_crash(run_cfg, tmp_path: Path, record: str,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    import time

    from shardstore.kd.run_changes import check_resume

    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="shardstore.kd.run_changes"):
        changes = check_resume(_state(run_cfg, config=record), run_cfg, run_dir=tmp_path, source=tmp_path / "c.pt",
                               world_size=1)
    assert changes.applied == () and "cannot be read" in caplog.text and "not compared" in caplog.text
    assert time.monotonic() - started < 1.5  # parsing 80 KB of YAML took 3 s before the size limit (not a benchmark)


@pytest.mark.parametrize("extra, needle", [({"epoch": "x"}, "its epoch is x"), ({"epoch": -5}, "its epoch is -5"),
                                           ({"epoch": True}, "its epoch is true"),
                                           ({"sampler": "x"}, "its sampler is x")])
def test_a_checkpoint_with_odd_fields_is_one_line(run_cfg, tmp_path: Path, extra: dict, needle: str) -> None:
    """Was `ValueError: invalid literal for int()` / `AttributeError: 'str' object has no attribute 'get'`."""
    from shardstore.errors import ConfigError
    from shardstore.kd.run_changes import check_resume

    with pytest.raises(ConfigError, match="not a shardstore training checkpoint") as info:
        check_resume(_state(run_cfg, **extra), run_cfg, run_dir=tmp_path, source=tmp_path / "c.pt", world_size=1)
    assert needle in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("kind", ["fifo", "symlink", "directory"])
def test_a_config_yaml_that_is_not_a_plain_file_is_not_read(run_cfg, tmp_path: Path, kind: str,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """A checkpoint without a recorded config is compared with RUN_DIR/config.yaml: a FIFO there blocked forever,
    a symlink was followed out of the run directory."""
    import signal

    from shardstore.kd.run_changes import check_resume

    outside = tmp_path / "outside.yaml"
    outside.write_text("model: {num_classes: 999}\n")
    record = tmp_path / "config.yaml"
    {"fifo": lambda: os.mkfifo(record), "symlink": lambda: record.symlink_to(outside),
     "directory": record.mkdir}[kind]()
    state = _state(run_cfg)
    del state["config"]

    class Hung(Exception):  # not an OSError: the reader must not swallow it
        pass

    def hung(*_: object) -> None:
        raise Hung("reading RUN_DIR/config.yaml blocked")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(5)
    try:
        changes = check_resume(state, run_cfg, run_dir=tmp_path, source=tmp_path / "c.pt", world_size=1)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert changes.applied == ()  # num_classes 999 outside the run directory was not compared
