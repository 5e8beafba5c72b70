"""The compiled kernels agree exactly with their NumPy references, and check their arguments."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shardstore import kernels, reference


@given(
    counts=st.lists(st.integers(0, 50), min_size=1, max_size=30),
    data=st.data(),
)
def test_locate_rows_matches_reference(counts: list[int], data: st.DataObject) -> None:
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    total = int(offsets[-1])
    if total == 0:
        ids = np.empty(0, np.int64)
    else:
        ids = np.array(data.draw(st.lists(st.integers(0, total - 1), max_size=200)), dtype=np.int64)
    got = kernels.locate_rows(ids, offsets)
    want = reference.locate_rows(ids, offsets)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    # And the meaning, independently of both: the row lies inside a non-empty shard.
    counts_arr = np.asarray(counts)
    assert np.all(got[1] >= 0) and np.all(got[1] < counts_arr[got[0]])


def test_locate_rows_edges() -> None:
    offsets = np.array([0, 3, 3, 3, 5], dtype=np.int64)  # two empty shards in the middle
    pos, row = kernels.locate_rows(np.array([0, 2, 3, 4], dtype=np.int64), offsets)
    assert pos.tolist() == [0, 0, 3, 3] and row.tolist() == [0, 2, 0, 1]
    with pytest.raises(IndexError, match=r"sample id 5 is out of range \[0, 5\) \(2 ids out of range\)"):
        kernels.locate_rows(np.array([5, -1], dtype=np.int64), offsets)


@pytest.mark.parametrize(
    ("ids", "match"),
    [
        (np.array([0], dtype=np.int32), "sample_ids must be a 1-D int64 array, got 1-D int32"),
        (np.zeros((1, 1), dtype=np.int64), "sample_ids must be a 1-D int64 array, got 2-D int64"),
        ([0], "sample_ids must be a numpy.ndarray of int64, got list"),
    ],
)
def test_locate_rows_type_errors(ids, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        kernels.locate_rows(ids, np.array([0, 1], dtype=np.int64))


def test_non_contiguous_input_is_handled() -> None:
    ids = np.arange(10, dtype=np.int64)[::2]
    pos, row = kernels.locate_rows(ids, np.array([0, 5, 10], dtype=np.int64))
    assert pos.tolist() == [0, 0, 0, 1, 1] and row.tolist() == [0, 2, 4, 1, 3]


def test_missing_extension_fails_loudly_on_import() -> None:
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['cshard._kernels'] = None\n"
        "try:\n    import shardstore\nexcept ImportError as e:\n    print(e)\nelse:\n    print('imported')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "shardstore's compiled extension is not built; run `pip install -e .`" in out
