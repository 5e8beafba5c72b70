"""The compiled kernels agree exactly with their NumPy references, and check their arguments."""

from __future__ import annotations

from pathlib import Path

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


def test_missing_extension_fails_loudly_at_first_use() -> None:
    """The package imports without the extension (it loads on first use); a kernel then fails loudly: no fallback."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['cshard._kernels'] = None\n"
        "import numpy as np\nfrom shardstore.store.reader import ShardStore\nfrom shardstore import kernels\n"
        "try:\n    kernels.locate_rows(np.zeros(1, np.int64), np.array([0, 1], np.int64))\n"
        "except ImportError as e:\n    print(e)\nelse:\n    print('ran')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "shardstore's compiled extension is not built; run `pip install -e .`" in out


@given(
    counts=st.lists(st.integers(0, 40), min_size=1, max_size=12),
    mixed=st.booleans(),
    seed=st.integers(0, 2**32),
)
def test_expand_epoch_matches_reference(counts: list[int], mixed: bool, seed: int) -> None:
    # Shards visited in a random order: (start, count) pairs of a real cache, shuffled together.
    base = np.array(counts, dtype=np.int64)
    perm = np.random.default_rng(seed).permutation(base.size)
    starts = np.concatenate([[0], np.cumsum(base)[:-1]])[perm].astype(np.int64)
    counts_arr = base[perm]
    source = None
    if mixed:
        source = np.repeat(np.arange(counts_arr.size, dtype=np.int64), counts_arr)
        np.random.default_rng(seed).shuffle(source)
    got = kernels.expand_epoch(starts.astype(np.int64), counts_arr, source)
    np.testing.assert_array_equal(got, reference.expand_epoch(starts, counts_arr, source))
    # Each shard is read front to back: its ids appear in increasing order.
    for s, c in zip(starts, counts_arr):
        mine = got[(got >= s) & (got < s + c)]
        assert mine.tolist() == list(range(s, s + c))


@given(
    world_size=st.integers(1, 8),
    batch_size=st.integers(1, 16),
    total=st.integers(0, 600),
    data=st.data(),
)
def test_split_rank_matches_reference(world_size: int, batch_size: int, total: int, data: st.DataObject) -> None:
    order = np.random.default_rng(total).permutation(total).astype(np.int64)
    steps = total // (world_size * batch_size)
    start = data.draw(st.integers(0, steps))
    rank = data.draw(st.integers(0, world_size - 1))
    got = kernels.split_rank(order, rank, world_size, batch_size, start, steps - start)
    np.testing.assert_array_equal(got, reference.split_rank(order, rank, world_size, batch_size, start, steps - start))


def test_expand_and_split_check_arguments() -> None:
    with pytest.raises(ValueError, match="source must name each visited shard exactly as often"):
        kernels.expand_epoch(np.array([0, 5], np.int64), np.array([2, 2], np.int64), np.array([0, 0, 0, 1], np.int64))
    with pytest.raises(ValueError, match="exceed the epoch's 10 samples"):
        kernels.split_rank(np.arange(10, dtype=np.int64), 0, 2, 3, 0, 2)
    with pytest.raises(ValueError, match=r"rank 2 is outside \[0, 2\)"):
        kernels.split_rank(np.arange(10, dtype=np.int64), 2, 2, 3, 0, 1)


def reference_rank_rows(counts: np.ndarray, source: np.ndarray | None, rank: int, world_size: int, batch_size: int,
                        start_batch: int, num_samples: int) -> tuple[np.ndarray, ...]:
    """The specification of ``kernels.rank_rows``, the slow way: (shard, row) of every read position of the
    epoch, the rank's positions taken from it, and the shards numbered in the order the rank first reads them."""
    counts = np.asarray(counts, dtype=np.int64)
    if source is None:
        source = np.repeat(np.arange(counts.size, dtype=np.int64), counts)
    row_at = np.empty(source.size, dtype=np.int64)
    for j in range(counts.size):
        where = np.flatnonzero(source == j)  # the positions shard j feeds, in order: its rows 0, 1, 2, ...
        row_at[where] = np.arange(where.size)
    k = np.arange(num_samples, dtype=np.int64)
    position = (start_batch + k // batch_size) * world_size * batch_size + rank * batch_size + k % batch_size
    shard, rows = source[position], row_at[position]
    touched, first = np.unique(shard, return_index=True)
    by_first_read = np.argsort(first, kind="stable")
    touched, first_sample = touched[by_first_read], first[by_first_read]
    local = np.full(counts.size, -1, dtype=np.int64)
    local[touched] = np.arange(touched.size)
    source_index = local[shard]
    last_sample = np.array([np.flatnonzero(source_index == t)[-1] for t in range(touched.size)], dtype=np.int64)
    return touched, source_index, rows, first_sample, last_sample.reshape(-1)


@given(
    counts=st.lists(st.integers(0, 40), min_size=1, max_size=12),
    mixed=st.booleans(),
    world_size=st.integers(1, 4),
    batch_size=st.integers(1, 9),
    seed=st.integers(0, 2**32),
    data=st.data(),
)
def test_rank_rows_matches_reference(counts: list[int], mixed: bool, world_size: int, batch_size: int, seed: int,
                                     data: st.DataObject) -> None:
    c = np.array(counts, dtype=np.int64)
    total = int(c.sum())
    source = None
    if mixed:
        source = np.repeat(np.arange(c.size, dtype=np.int64), c)
        np.random.default_rng(seed).shuffle(source)
    steps = total // (world_size * batch_size)
    rank = data.draw(st.integers(0, world_size - 1))
    start = data.draw(st.integers(0, steps))
    # Whole batches, or (one rank) a short last batch too: any number of samples up to the epoch's end.
    last = steps - start if world_size > 1 else None
    num_samples = (data.draw(st.integers(0, last)) * batch_size if last is not None
                   else data.draw(st.integers(0, total - start * batch_size)))
    got = kernels.rank_rows(c, source, rank, world_size, batch_size, start, num_samples)
    want = reference_rank_rows(c, source, rank, world_size, batch_size, start, num_samples)
    for name, g, w in zip(("touched", "source_index", "rows", "first_sample", "last_sample"), got, want):
        np.testing.assert_array_equal(g, w, err_msg=name)
        assert g.dtype == np.int64
    # And the meaning, through the other kernels: the same samples as expanding the epoch to ids and splitting it.
    starts = np.concatenate([[0], np.cumsum(c)[:-1]]).astype(np.int64)
    touched, source_index, rows = got[:3]
    ids = starts[touched][source_index] + rows
    order = kernels.expand_epoch(starts, c, source)
    if world_size > 1 or num_samples % batch_size == 0:
        np.testing.assert_array_equal(ids, kernels.split_rank(order, rank, world_size, batch_size, start,
                                                               num_samples // batch_size))
    else:
        np.testing.assert_array_equal(ids, order[start * batch_size : start * batch_size + num_samples])


def test_rank_rows_edges() -> None:
    counts = np.array([3, 0, 0, 4, 2], dtype=np.int64)  # empty shards are never touched
    touched, source_index, rows, first, last = kernels.rank_rows(counts, None, 0, 1, 4, 0, 9)
    assert touched.tolist() == [0, 3, 4] and source_index.tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2]
    assert rows.tolist() == [0, 1, 2, 0, 1, 2, 3, 0, 1] and first.tolist() == [0, 3, 7] and last.tolist() == [2, 6, 8]
    # Rank 1 of 2, batches of 2, from global batch 1: positions 6, 7 of the epoch (shard 3 rows 3, shard 4 row 0).
    touched, source_index, rows, first, last = kernels.rank_rows(counts, None, 1, 2, 2, 1, 2)
    assert touched.tolist() == [3, 4] and rows.tolist() == [3, 0] and first.tolist() == [0, 1]
    # A merge: the rank's first read decides the order of ``touched``, not the shards' visit order.
    source = np.array([3, 0, 3, 4, 0, 3, 0, 4, 3], dtype=np.int64)
    touched, source_index, rows, first, last = kernels.rank_rows(counts, source, 0, 1, 3, 0, 9)
    assert touched.tolist() == [3, 0, 4] and rows.tolist() == [0, 0, 1, 0, 1, 2, 2, 1, 3]
    assert first.tolist() == [0, 1, 3] and last.tolist() == [8, 6, 7]
    for got in kernels.rank_rows(counts, None, 0, 1, 4, 0, 0):
        assert got.size == 0


def test_rank_rows_checks_arguments() -> None:
    counts = np.array([2, 2], dtype=np.int64)
    with pytest.raises(ValueError, match="source must name each visited shard exactly as often"):
        kernels.rank_rows(counts, np.array([0, 0, 0, 1], np.int64), 0, 1, 4, 0, 4)
    with pytest.raises(ValueError, match="source must name each visited shard"):
        kernels.rank_rows(counts, np.array([0, 2, 1, 1], np.int64), 0, 1, 4, 0, 4)
    with pytest.raises(ValueError, match="source has 3 entries, the shards 4 samples"):
        kernels.rank_rows(counts, np.array([0, 1, 1], np.int64), 0, 1, 4, 0, 3)
    with pytest.raises(ValueError, match="reach past the epoch's 4 samples"):
        kernels.rank_rows(counts, None, 1, 2, 2, 0, 4)
    with pytest.raises(ValueError, match="reach past the epoch's 4 samples"):
        kernels.rank_rows(counts, None, 0, 1, 2, 1, 3)
    with pytest.raises(ValueError, match=r"rank 2 is outside \[0, 2\)"):
        kernels.rank_rows(counts, None, 2, 2, 1, 0, 1)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        kernels.rank_rows(counts, None, 0, 1, 0, 0, 1)
    with pytest.raises(TypeError, match="counts must be a 1-D int64 array, got 1-D int32"):
        kernels.rank_rows(counts.astype(np.int32), None, 0, 1, 1, 0, 1)
    with pytest.raises(ValueError, match="counts must be non-negative"):
        kernels.rank_rows(np.array([2, -1], np.int64), None, 0, 1, 1, 0, 1)


def test_split_rank_refuses_a_batch_size_below_one() -> None:
    """A zero batch size once reached a C division (SIGFPE killed the process); both layers refuse it."""
    from cshard import _kernels

    order = np.arange(10, dtype=np.int64)
    with pytest.raises(ValueError, match="batch_size >= 1"):
        _kernels.split_rank(order, 0, 1, 0, 0, np.empty(0, np.int64))
    with pytest.raises(ValueError, match="batch_size >= 1"):
        _kernels.split_rank(order, 0, 1, -3, 0, np.empty(4, np.int64))
    with pytest.raises(ValueError, match="exceed the 10 ids"):
        _kernels.split_rank(order, 0, 1, 4, 0, np.empty(12, np.int64))
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        kernels.split_rank(order, 0, 1, 0, 0, 1)


def test_compiler_directives_live_in_the_pyx_header() -> None:
    """One place for them: the build passes none, so a build without setup.py compiles the same code."""
    root = Path(__file__).resolve().parents[1]
    header = (root / "cshard" / "_kernels.pyx").read_text().splitlines()[0]
    for directive in ("language_level=3", "boundscheck=False", "wraparound=False", "cdivision=False"):
        assert directive in header
    assert "compiler_directives" not in (root / "setup.py").read_text()
