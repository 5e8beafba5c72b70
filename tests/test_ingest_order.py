"""Image ingest order and decoding processes: shards are class-mixed by default, the order is a pure function of the
seed and the source size (recorded in ``order.json``, refused when a job asks for another), restarts and parallel
jobs follow it without decoding finished rows, and any number of decoding processes writes the same bytes."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from shardstore.cli import main
from shardstore.errors import ShardstoreError
from shardstore.store import decode
from shardstore.store.decode import decode_in_order
from shardstore.store.ingest import list_image_folder, write_image_folder
from shardstore.store.order import source_order
from tests.test_ingest import make_folder, read


def digests(root: Path) -> dict[str, str]:
    """Every file of a cache but the manifest (it records mtimes), by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "manifest.json"}


def classes_per_shard(labels: np.ndarray, shard_size: int) -> list[int]:
    return [len(set(labels[lo : lo + shard_size].tolist())) for lo in range(0, len(labels), shard_size)]


# --- the order ----------------------------------------------------------------------------------------------------


def test_the_order_is_a_pure_function_of_seed_and_size() -> None:
    # Pinned: a restarted job (or another NumPy) must compute the very same order.
    assert source_order(10, 0).tolist() == [3, 2, 1, 8, 6, 0, 7, 4, 5, 9]
    assert source_order(10, 1).tolist() == [9, 2, 4, 7, 5, 0, 8, 6, 3, 1]
    assert source_order(10, None).tolist() == list(range(10))
    big = source_order(10_000, 7)
    assert np.array_equal(np.sort(big), np.arange(10_000)) and np.array_equal(big, source_order(10_000, 7))
    assert source_order(0, 3).shape == (0,)
    with pytest.raises(ShardstoreError, match="the shuffle seed must be a non-negative integer, got -1"):
        source_order(5, -1)


def test_a_folder_becomes_class_mixed_shards_by_default(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "imgs", per_class=6, classes=("a", "b", "c", "d"))
    write_image_folder(tmp_path / "mixed", folder, image_size=8, shard_size=6, fsync=False)
    write_image_folder(tmp_path / "sorted", folder, image_size=8, shard_size=6, shuffle_seed=None, fsync=False)
    mixed, ordered = read(tmp_path / "mixed"), read(tmp_path / "sorted")
    assert classes_per_shard(ordered["labels"], 6) == [1, 1, 1, 1]  # what the source order gives
    assert min(classes_per_shard(mixed["labels"], 6)) >= 3
    assert mixed["ids"].tolist() == source_order(24, 0).tolist()
    # Each row is the same sample as in source order: its image and label travel with its id.
    for name in ("images", "labels"):
        np.testing.assert_array_equal(mixed[name], ordered[name][mixed["ids"]])
    assert json.loads((tmp_path / "mixed" / "order.json").read_text())["shuffle_seed"] == 0
    assert json.loads((tmp_path / "sorted" / "order.json").read_text())["shuffle_seed"] is None


def test_shard_range_jobs_follow_one_shuffled_order(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "imgs", per_class=7)
    write_image_folder(tmp_path / "one", folder, image_size=8, shard_size=3, shuffle_seed=5, fsync=False)
    for start, num in ((4, 1), (2, 2), (0, 2)):  # any order of the jobs
        write_image_folder(tmp_path / "par", folder, image_size=8, shard_size=3, start_shard=start, num_shards=num,
                           shuffle_seed=5, fsync=False)
    assert digests(tmp_path / "one") == digests(tmp_path / "par")


def test_a_restarted_shuffled_job_decodes_only_the_rows_it_has_not_written(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    folder = make_folder(tmp_path / "imgs")
    order = source_order(10, 0)
    broken = int(order[1])  # the second row of the order cannot be decoded: shard 0 holds order[0, 2, 3, 4]
    listing = list_image_folder(folder)
    listing.paths[broken].write_bytes(b"broken")
    root = tmp_path / "c"
    seen: list[int] = []

    def crash_after_seven(n: int) -> None:
        seen.append(n)
        if len(seen) == 7:
            raise KeyboardInterrupt  # the job dies with shard 0 complete and 2 samples buffered

    with pytest.raises(KeyboardInterrupt):
        write_image_folder(root, listing, image_size=8, shard_size=4, workers=1, fsync=False,
                           progress=crash_after_seven)
    assert sorted(p.name for p in root.iterdir()) == ["classes.json", "order.json", "shard_000000"]
    assert np.load(root / "shard_000000" / "ids.npy").tolist() == order[[0, 2, 3, 4]].tolist()
    first = (root / "shard_000000" / "images.npy").stat().st_mtime_ns
    decoded: list[str] = []
    real = decode.load_image
    monkeypatch.setattr(decode, "load_image", lambda source, size: decoded.append(source) or real(source, size))
    report = write_image_folder(root, listing, image_size=8, shard_size=4, workers=1, fsync=False)
    assert report.samples_already_written == 4 and report.samples_written == 5
    assert decoded == [str(listing.paths[r]) for r in order[5:]]  # nothing before the resume point again
    assert (root / "shard_000000" / "images.npy").stat().st_mtime_ns == first
    assert read(root)["ids"].tolist() == np.delete(order, 1).tolist()


# --- order.json ---------------------------------------------------------------------------------------------------


def cli(args: list[object], capsys: pytest.CaptureFixture) -> str:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in captured.err, captured.err
    return lines[0].removeprefix("shardstore: error: ")


@pytest.mark.parametrize(("flags", "asks"), [
    (["--shuffle-seed", 1], "10 source rows shuffled with --shuffle-seed 1"),
    (["--no-shuffle"], "10 source rows in source order (--no-shuffle)"),
])
def test_continuing_a_cache_in_another_order_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                       flags: list[object], asks: str) -> None:
    folder = make_folder(tmp_path / "imgs")
    root = tmp_path / "c"
    write_image_folder(root, folder, image_size=8, shard_size=4, num_shards=1, fsync=False)
    before = digests(root)
    line = cli(["write", root, "--from-folder", folder, "--image-size", 8, "--shard-size", 4, *flags], capsys)
    assert line == (f"{root / 'order.json'}: this cache holds 10 source rows shuffled with --shuffle-seed 0, this job "
                    f"asks for {asks}; pass --shuffle-seed 0 with the same source to continue it, or delete {root} "
                    f"(or write to a new cache directory) to start over with {asks}")
    assert digests(root) == before
    # The fix it names works: the default seed (0) continues the cache.
    assert main(["write", str(root), "--from-folder", str(folder), "--image-size", "8", "--shard-size", "4"]) == 0
    assert len(read(root)["ids"]) == 10


def test_a_source_that_grew_is_refused_naming_its_new_size(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "imgs")
    root = tmp_path / "c"
    write_image_folder(root, folder, image_size=8, shard_size=4, num_shards=1, fsync=False)
    (folder / "cat" / "999.jpg").write_bytes((folder / "cat" / "000.jpg").read_bytes())  # one more image
    with pytest.raises(ShardstoreError, match=re.escape("this cache holds 10 source rows shuffled with --shuffle-seed "
                                                        "0, this job asks for 11 source rows") +
                       r".*; the source now has 11 rows \(the order depends on the number of rows\), or delete"):
        write_image_folder(root, folder, image_size=8, shard_size=4, fsync=False)


@pytest.mark.parametrize("text", [b"{", b"[]", b'{"format": 1, "shuffle_seed": "x", "num_rows": 10, '
                                               b'"order_sha256": "0"}'])
def test_a_broken_order_json_is_one_line(tmp_path: Path, text: bytes) -> None:
    folder = make_folder(tmp_path / "imgs")
    root = tmp_path / "c"
    write_image_folder(root, folder, image_size=8, shard_size=4, num_shards=1, fsync=False)
    (root / "order.json").write_bytes(text)
    with pytest.raises(ShardstoreError, match=rf"^{re.escape(str(root / 'order.json'))}: not a readable record of "
                                              rf"the order the cache's rows were written in \(.*\); delete "
                                              rf"{re.escape(str(root))}"):
        write_image_folder(root, folder, image_size=8, shard_size=4, fsync=False)


def test_an_order_computed_differently_is_refused(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "imgs")
    root = tmp_path / "c"
    write_image_folder(root, folder, image_size=8, shard_size=4, num_shards=1, fsync=False)
    record = json.loads((root / "order.json").read_text())
    (root / "order.json").write_text(json.dumps({**record, "order_sha256": "0" * 64}))
    with pytest.raises(ShardstoreError, match="the order computed now differs from the one the cache was written in"):
        write_image_folder(root, folder, image_size=8, shard_size=4, fsync=False)


# --- decoding processes -------------------------------------------------------------------------------------------


def test_decode_in_order_keeps_the_order_and_reports_failures_in_place(tmp_path: Path) -> None:
    listing = list_image_folder(make_folder(tmp_path / "imgs"))
    listing.paths[3].write_bytes(b"broken")
    rows = source_order(10, 2)
    got = list(decode_in_order(rows, listing.inputs, 8, workers=1, chunk_rows=3))
    assert [row for row, _ in got] == rows.tolist()
    bad = [row for row, image in got if isinstance(image, str)]
    assert bad == [3] and "cannot identify image file" in dict(got)[3]
    with pytest.raises(ShardstoreError, match="workers must be at least 1, got 0"):
        list(decode_in_order(rows, listing.inputs, 8, workers=0))
    with pytest.raises(ShardstoreError, match="workers must be at least 1, got 0; pass --workers 1"):
        write_image_folder(tmp_path / "c", listing, image_size=8, workers=0)
    assert not (tmp_path / "c").exists()


@pytest.mark.slow
def test_three_decoding_processes_write_the_same_cache_as_one(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "imgs", per_class=15, classes=("a", "b", "c"))
    (folder / "b" / "004.jpg").write_bytes(b"broken")  # a skipped image inside a worker's chunk
    reports = {}
    for workers in (1, 3):
        reports[workers] = write_image_folder(tmp_path / f"w{workers}", folder, image_size=12, shard_size=7,
                                              workers=workers, chunk_rows=4, fsync=False)
    assert digests(tmp_path / "w1") == digests(tmp_path / "w3")
    assert reports[1].bad_inputs == reports[3].bad_inputs == [(str(folder / "b" / "004.jpg"),
                                                               reports[1].bad_inputs[0][1])]
    assert reports[3].samples_written == 44
    # --on-error stop names the file, from inside a worker too, and leaves no shard past the bad image.
    with pytest.raises(ShardstoreError, match=rf"^{re.escape(str(folder / 'b' / '004.jpg'))}: cannot decode image "
                                              r"\(.*\); fix or remove it, or pass --on-error skip$"):
        write_image_folder(tmp_path / "stop", folder, image_size=12, shard_size=7, workers=3, chunk_rows=4,
                           on_error="stop", fsync=False)


class _ExitsWhenUnpickled:
    """An input that ends the decoding process receiving it, as a decoder crash (a segfault) would."""

    def __reduce__(self) -> tuple[object, tuple[int]]:
        return os._exit, (3,)


@pytest.mark.slow
def test_a_decoding_process_that_dies_is_one_line_naming_the_rows(tmp_path: Path) -> None:
    listing = list_image_folder(make_folder(tmp_path / "imgs"))

    def fetch(rows: np.ndarray) -> list[object]:
        return [_ExitsWhenUnpickled() if int(r) == 7 else str(listing.paths[int(r)]) for r in rows]

    rows = np.arange(10)
    with pytest.raises(ShardstoreError, match=r"^a decoding process died while decoding source rows \d\.\.\d \(.*\); "
                                              r"run again \(finished shards are kept\), with --workers 1 to find an "
                                              r"image that crashes the decoder$"):
        list(decode_in_order(rows, fetch, 8, workers=2, chunk_rows=3))

