"""Tiny caches for the tests: a few shards of a few rows, the last one short."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings

from shardstore import ShardWriter

TESTS = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Leave out the tests marked ``slow`` unless the command line has ``-m``: ``python -m pytest`` stays quick,
    ``python -m pytest -m slow`` runs the rest (CI runs both), ``-m ""`` runs everything.

    Only tests under ``tests/``: the benchmarks' own ``slow`` marks keep their meaning in ``pytest bench``.
    """
    if config.option.markexpr or any(arg.startswith("-m") for arg in config.invocation_params.args):
        return
    slow = [item for item in items if item.get_closest_marker("slow") and TESTS in item.path.parents]
    if slow:
        skipped = set(slow)
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if item not in skipped]


settings.register_profile("ci", deadline=None, max_examples=60, derandomize=True)
settings.register_profile("dev", deadline=None, max_examples=100)
settings.load_profile("ci")


def sample_arrays(n: int, start: int = 0) -> dict[str, np.ndarray]:
    """``n`` samples whose values encode their global index, so any misplaced row is detectable."""
    idx = np.arange(start, start + n)
    return {
        "images": (idx[:, None, None, None] + np.arange(2 * 3 * 4).reshape(1, 2, 3, 4)).astype(np.uint8),
        "labels": (idx % 7).astype(np.int64),
        "feats": (idx[:, None] * np.array([1.0, -0.5, 0.25], dtype=np.float16)).astype(np.float16),
    }


def errors_in_threads(target: Callable[[int], object], count: int = 8) -> list[BaseException]:
    """Run ``target(0)`` ... ``target(count - 1)`` in as many threads released at once; what they raised."""
    barrier, errors = threading.Barrier(count), []

    def run(n: int) -> None:
        try:
            barrier.wait()
            target(n)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def write_native(root: Path, n: int, shard_size: int, **kwargs) -> Path:
    """A native cache of ``n`` samples from ``sample_arrays`` (fsync off: tests need speed, not durability)."""
    kwargs.setdefault("fsync", False)
    with ShardWriter(root, shard_size, **kwargs) as w:
        w.add_batch(sample_arrays(n))
    return root


def write_flat(root: Path, n: int, shard_size: int, digits: int = 6) -> Path:
    """A flat cache the way people write it by hand: ``np.save(root/f"{field}_{id}.npy")``."""
    root.mkdir(parents=True, exist_ok=True)
    data = sample_arrays(n)
    for shard_id, lo in enumerate(range(0, n, shard_size)):
        for name, arr in data.items():
            np.save(root / f"{name}_{shard_id:0{digits}d}.npy", arr[lo : lo + shard_size])
    return root


@pytest.fixture
def native_cache(tmp_path: Path) -> Path:
    """10 samples in shards of 4: rows 4, 4, 2."""
    return write_native(tmp_path / "cache", 10, 4)


@pytest.fixture
def flat_cache(tmp_path: Path) -> Path:
    """10 samples in flat shards of 4: rows 4, 4, 2."""
    return write_flat(tmp_path / "flat", 10, 4)
