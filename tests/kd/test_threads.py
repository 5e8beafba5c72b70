"""torch's CPU threads: what the machine leaves after the loader's threads by default, `train.threads` when set."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from shardstore.config.resolve import DEFAULT_DATA_CONFIG, DEFAULT_MODEL_CONFIG, DEFAULT_TRAIN_CONFIG, load_run_config
from shardstore.kd import threads
from shardstore.kd.threads import auto_threads, available_cpus, cgroup_cpu_limit, configure_threads
from shardstore.kd.trainer import train

from .conftest import overrides

CONFIGS = [DEFAULT_DATA_CONFIG, DEFAULT_TRAIN_CONFIG, DEFAULT_MODEL_CONFIG]


@pytest.fixture(autouse=True)
def keep_torch_threads(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(("cpus", "loader", "processes", "env", "want"), [
    (16, 2, 1, {}, 14),  # a node of its own: every core but the loader's
    (2, 2, 1, {}, 1),  # the shared 2-core case: one thread, never none
    (32, 2, 4, {}, 6),  # torchrun --nproc_per_node 4: each process's share, less its loader threads
    (16, 2, 1, {"OMP_NUM_THREADS": "3"}, 3),  # an explicit environment wins
    (16, 2, 1, {"OMP_NUM_THREADS": "lots"}, 14),  # ... when it is a number
])
def test_auto_threads(cpus: int, loader: int, processes: int, env: dict, want: int) -> None:
    assert auto_threads(loader, cpus=cpus, processes=processes, env=env) == want


@pytest.mark.parametrize(("text", "want"), [("200000 100000\n", 2), ("150000 100000", 2), ("max 100000", None),
                                            ("garbage", None), ("1 0", None)])
def test_cgroup_quota(tmp_path: Path, text: str, want: int | None) -> None:
    (tmp_path / "cpu.max").write_text(text)
    assert cgroup_cpu_limit(tmp_path / "cpu.max") == want
    assert cgroup_cpu_limit(tmp_path / "missing") is None


def test_available_cpus_is_the_affinity_capped_by_the_quota(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5}, raising=False)
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: None)
    assert available_cpus() == 6
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: 2)
    assert available_cpus() == 2


def test_configure_threads_sets_torch(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(threads, "available_cpus", lambda: 5)
    with caplog.at_level(logging.INFO, logger="shardstore.kd.threads"):
        assert configure_threads(None, 2) == 3 and torch.get_num_threads() == 3
        assert configure_threads(0, 2) == 3  # 0 is auto too
        assert configure_threads(2, 2) == 2 and torch.get_num_threads() == 2
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        assert configure_threads(None, 1) == 1  # 5 // 2 - 1
    assert "torch uses 3 CPU thread(s) (5 CPUs / 1 process(es) on the node - 2 loader thread(s))" in caplog.text
    assert "torch uses 2 CPU thread(s) (train.threads)" in caplog.text


@pytest.mark.slow
def test_training_applies_the_setting(tiny_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "available_cpus", lambda: 7)
    torch.set_num_threads(2)
    train(load_run_config(*CONFIGS, overrides(tmp_path / "auto", tiny_cache, train__epochs=1,
                                              train__max_steps_per_epoch=2, data__loader_threads=2)))
    assert torch.get_num_threads() == 5  # 7 CPUs - 2 loader threads
    train(load_run_config(*CONFIGS, overrides(tmp_path / "set", tiny_cache, train__epochs=1,
                                              train__max_steps_per_epoch=2, train__threads=3)))
    assert torch.get_num_threads() == 3
