"""One run per run directory: ``RUN_DIR/.lock`` refuses a second run naming the holder, a dead holder's lock is
taken over with a warning, and the file is never followed through a symlink."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from shardstore.config.resolve import DEFAULT_DATA_CONFIG, DEFAULT_MODEL_CONFIG, DEFAULT_TRAIN_CONFIG, load_run_config
from shardstore.errors import ConfigError
from shardstore.kd.checkpoint import load_checkpoint
from shardstore.kd.lock import RunDirLock
from shardstore.kd.trainer import train

from .conftest import overrides

CONFIGS = [DEFAULT_DATA_CONFIG, DEFAULT_TRAIN_CONFIG, DEFAULT_MODEL_CONFIG]


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_second_holder_is_refused_naming_the_first(tmp_path: Path) -> None:
    with RunDirLock(tmp_path) as first:
        record = json.loads((tmp_path / ".lock").read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        holder = rf"pid {os.getpid()} on host {socket.gethostname()}, started .*"
        with pytest.raises(ConfigError, match=rf"^train.run_dir {tmp_path} is in use by another run \({holder}\); "
                                              r"wait for it to end \(or stop it\), or choose another train.run_dir$"):
            RunDirLock(tmp_path).acquire()  # a second open file: flock refuses it even in this process
        first.acquire()  # idempotent for its holder
    assert (tmp_path / ".lock").read_bytes() == b""  # released: emptied, never deleted
    with RunDirLock(tmp_path):
        pass


def test_the_lock_of_a_process_that_died_is_taken_over_with_a_warning(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    pid = dead_pid()
    (tmp_path / ".lock").write_text(json.dumps({"pid": pid, "host": "node07", "started": "2024-05-01T10:00:00"}))
    with caplog.at_level(logging.WARNING, logger="shardstore.kd.lock"), RunDirLock(tmp_path):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert [r.getMessage() for r in caplog.records] == [
        f"train.run_dir {tmp_path}: taking over the lock of pid {pid} on host node07, started 2024-05-01T10:00:00, "
        "which ended without releasing it"]


def test_a_planted_symlink_is_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".lock").symlink_to(outside)
    with pytest.raises(ConfigError, match=r"\.lock: cannot open the run directory's lock file"):
        RunDirLock(run_dir).acquire()
    assert outside.read_text() == "keep me"


def test_a_record_that_is_not_ours_is_shown_safely(tmp_path: Path) -> None:
    path = tmp_path / ".lock"
    path.write_text(json.dumps({"pid": "1; rm -rf /", "host": "\x1b[31mred"}))
    fd = os.open(path, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # held by "someone" whose record is garbage
    try:
        with pytest.raises(ConfigError, match=r"in use by another run \(a process whose pid is not recorded\)"):
            RunDirLock(tmp_path).acquire()
    finally:
        os.close(fd)


def test_train_refuses_a_run_dir_in_use_before_building_anything(tiny_cache: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with RunDirLock(run_dir):
        with pytest.raises(ConfigError, match=rf"^train.run_dir {run_dir} is in use by another run \(pid "
                                              rf"{os.getpid()} "):
            train(load_run_config(*CONFIGS, overrides(run_dir, tiny_cache, train__epochs=1)))
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]  # nothing written


@pytest.mark.slow
def test_two_cli_runs_at_once_the_second_is_one_line_naming_the_first(tmp_path: Path) -> None:
    from tests.attack.harness import assert_one_line_error, cli, cli_start, run_sets, tiny_cache, warm

    cache = tiny_cache(tmp_path / "cache")
    sets = run_sets(tmp_path / "run", cache, train__epochs=50, train__checkpoint__every_steps=0)
    warm()
    first = cli_start("train", *sets, "--device", "cpu")
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not metrics.exists() or '"step"' not in metrics.read_text():
        assert first.alive() and time.monotonic() < deadline, first.wait(1).describe()
        time.sleep(0.01)
    second = cli("train", *sets, "--resume", "--device", "cpu")
    line = assert_one_line_error(second, f"is in use by another run (pid {first.pid} on host {socket.gethostname()}")
    assert first.alive(), "the first run was disturbed"
    os.kill(first.pid, 15)
    assert first.wait().code == 75
    # The first run's lock is gone with it: the second command now continues the run (shortened to end soon).
    pointer = json.loads((tmp_path / "run" / "checkpoints" / "latest.json").read_text())
    epochs = int(load_checkpoint(tmp_path / "run" / "checkpoints" / pointer["path"])["epoch"]) + 1
    resumed = cli("train", *run_sets(tmp_path / "run", cache, train__epochs=epochs, train__checkpoint__every_steps=0),
                  "--resume", "--device", "cpu")
    assert resumed.code == 0, resumed.describe()
    print(f"\nlock: {line}")


@pytest.mark.slow
def test_a_run_killed_with_sigkill_leaves_a_lock_the_next_run_takes_over(tmp_path: Path) -> None:
    from tests.attack.harness import cli, cli_start, run_sets, tiny_cache, warm

    cache = tiny_cache(tmp_path / "cache")
    sets = run_sets(tmp_path / "run", cache)
    warm()
    child = cli_start("train", *sets, "--device", "cpu")
    checkpoints = tmp_path / "run" / "checkpoints" / "latest.json"
    deadline = time.monotonic() + 120
    while not checkpoints.exists():
        assert child.alive() and time.monotonic() < deadline, child.wait(1).describe()
        time.sleep(0.01)
    child.kill()
    assert child.wait().code == -9
    assert json.loads((tmp_path / "run" / ".lock").read_text())["pid"] == child.pid  # its record stays
    resumed = cli("train", *sets, "--resume", "--device", "cpu")
    assert resumed.code == 0, resumed.describe()
    assert f"taking over the lock of pid {child.pid} on host {socket.gethostname()}" in resumed.err
