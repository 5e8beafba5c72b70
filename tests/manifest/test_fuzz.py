"""Property tests: random bytes and truncated headers never crash the manifest builder, and the file is named."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardstore import build_manifest
from tests.conftest import write_flat


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


GOOD = npy_bytes(np.arange(12, dtype=np.int32).reshape(4, 3))

damaged = st.one_of(
    st.binary(max_size=300),  # anything at all
    st.integers(0, len(GOOD) - 1).map(lambda n: GOOD[:n]),  # truncated anywhere, header included
    st.tuples(st.integers(0, len(GOOD) - 1), st.integers(0, 255)).map(  # one byte flipped
        lambda t: GOOD[: t[0]] + bytes([t[1]]) + GOOD[t[0] + 1 :]
    ),
    st.binary(max_size=120).map(lambda b: b"\x93NUMPY\x01\x00" + b),  # valid magic, junk header
    st.text(max_size=100).map(lambda s: b"\x93NUMPY\x01\x00" + len(s.encode()).to_bytes(2, "little") + s.encode()),
)


@pytest.mark.slow
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=damaged)
def test_random_bytes_never_crash_and_name_the_file(tmp_path_factory, payload: bytes) -> None:
    root = write_flat(Path(tmp_path_factory.mktemp("fuzz")), 12, 4)
    (root / "feats_000001.npy").write_bytes(payload)
    report = build_manifest(root, write=False)
    ids = [s.id for s in report.manifest.shards]
    assert 0 in ids and 2 in ids  # the healthy shards are always kept
    for problem in report.problems:
        assert problem.path == "feats_000001.npy" and problem.shard_id == 1
        assert "\n" not in str(problem)
    if 1 not in ids:
        assert len(report.problems) == 1
