"""Writers as separate processes: killed with SIGKILL in the middle of a shard, and two at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from shardstore import ShardStore, build_manifest
from tests.conftest import sample_arrays

REPO = Path(__file__).resolve().parents[2]

WRITER = textwrap.dedent(
    """
    import sys, time, numpy as np
    sys.path.insert(0, {repo!r})
    from shardstore import ShardWriter
    from tests.conftest import sample_arrays
    root, start, num, total, hang_on = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    if hang_on != "-":
        # Stop forever inside the file writes of shard `hang_on`, after its first field was written:
        # the process is killed there, with a half-written shard in its temporary directory.
        from shardstore.store import writer as writer_module
        real = writer_module.write_npy
        calls = []
        def write_npy(f, arr):
            real(f, arr)
            if f.name.split("/")[-2].startswith(".shard_" + hang_on):
                calls.append(1)
                if len(calls) == 2:
                    f.flush()
                    open(root + "/../ready", "w").close()
                    time.sleep(600)
        writer_module.write_npy = write_npy
    data = sample_arrays(total, start=start * 4)
    with ShardWriter(root, 4, start_shard=start, num_shards=num) as w:
        for i in range(total):
            w.add({{k: v[i] for k, v in data.items()}})
    """
)


def run_writer(root: Path, start: int, num: int, total: int, hang_on: str = "-") -> subprocess.Popen:
    script = WRITER.format(repo=str(REPO))
    return subprocess.Popen([sys.executable, "-c", script, str(root), str(start), str(num), str(total), hang_on])


@pytest.mark.slow
def test_writer_killed_mid_shard_leaves_no_partial_shard_and_restart_finishes(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    proc = run_writer(root, 0, 3, 10, hang_on="000001")
    deadline = time.monotonic() + 60
    while not (tmp_path / "ready").exists():
        assert proc.poll() is None, "writer exited early"
        assert time.monotonic() < deadline, "writer never reached the second shard"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    names = sorted(p.name for p in root.iterdir())
    assert "shard_000000" in names and "shard_000001" not in names
    temporaries = [n for n in names if n.startswith(".shard_000001.tmp-")]
    assert len(temporaries) == 1  # the half-written shard exists only under its hidden name
    report = build_manifest(root)
    assert [s.id for s in report.manifest.shards] == [0] and report.problems == []

    restarted = run_writer(root, 0, 3, 10)
    assert restarted.wait(timeout=60) == 0
    assert not (root / temporaries[0]).exists()  # the dead writer's temporary was cleaned up
    build_manifest(root)
    store = ShardStore.open(root)
    assert [s.num_samples for s in store.shards] == [4, 4, 2]
    images = np.concatenate([store.field(p, "images") for p in range(store.num_shards)])
    np.testing.assert_array_equal(images, sample_arrays(10)["images"])


@pytest.mark.slow
def test_two_concurrent_writers_fill_disjoint_ranges(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    root.mkdir()
    procs = [run_writer(root, 0, 5, 20), run_writer(root, 5, 5, 18)]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    report = build_manifest(root)
    assert report.problems == []
    store = ShardStore.open(root)
    assert [s.id for s in store.shards] == list(range(10))
    assert [s.num_samples for s in store.shards] == [4] * 9 + [2]
    images = np.concatenate([store.field(p, "images") for p in range(store.num_shards)])
    np.testing.assert_array_equal(images, sample_arrays(38)["images"])
