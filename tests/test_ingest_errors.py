"""Mistakes and damage met while filling a cache, each one line (exit code 2 from the CLI), none a silent success:
a broken ``classes.json``, a folder resume into a cache without ``ids``, a damaged ``ids.npy`` (in source order
and in a shuffled order), a shard size or an image size no machine can hold."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from shardstore.cli import main
from shardstore.errors import ShardstoreError, WriterError
from shardstore.store import decode
from shardstore.store.ingest import write_arrays, write_image_folder
from shardstore.store.writer import ShardWriter
from tests.conftest import write_native
from tests.test_ingest import make_folder


def cli(args: list[str], capsys: pytest.CaptureFixture) -> str:
    """Run the CLI expecting a user error: exit 2 and exactly one line on stderr, which is returned."""
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert lines[0].startswith("shardstore: error: ")
    return lines[0].removeprefix("shardstore: error: ")


@pytest.fixture
def started(tmp_path: Path) -> tuple[Path, Path]:
    """An image folder of 10 images and a cache whose first job wrote shard 0 (4 images) of it, shuffled."""
    folder = make_folder(tmp_path / "imgs")
    root = tmp_path / "c"
    write_image_folder(root, folder, image_size=8, shard_size=4, num_shards=1, fsync=False)
    return folder, root


# --- classes.json ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "message"), [
    (b'["cat", "do', r"not a readable list of class names \(.*\); delete it and run again: it is written again"),
    (b"\xff\xfe", r"not a readable list of class names"),
    (b'{"cat": 0}', r"expected a list of class names, got dict; delete it and run again"),
    (b"[1, 2]", r"expected a list of class names, got list; delete it"),
])
def test_a_broken_classes_json_is_one_line(started: tuple[Path, Path], capsys: pytest.CaptureFixture, text: bytes,
                                           message: str) -> None:
    folder, root = started
    (root / "classes.json").write_bytes(text)
    with pytest.raises(ShardstoreError, match=rf"^{re.escape(str(root / 'classes.json'))}: {message}"):
        write_image_folder(root, folder, image_size=8, shard_size=4, fsync=False)
    assert re.match(rf"{re.escape(str(root / 'classes.json'))}: {message}",
                    cli(["write", root, "--from-folder", folder, "--image-size", 8, "--shard-size", 4], capsys))
    (root / "classes.json").unlink()  # the fix the message gives
    report = write_image_folder(root, folder, image_size=8, shard_size=4, fsync=False)
    assert report.samples_already_written == 4 and report.samples_written == 6


# --- resuming a folder ingest from the ids on disk ---------------------------------------------------------------


def test_a_folder_resume_into_a_cache_without_ids_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = make_folder(tmp_path / "imgs")
    root = write_native(tmp_path / "c", 10, 4)  # images, labels, feats: no ids, no order.json
    # Shards without order.json were written in source order: a shuffled job must not continue them.
    unordered = (f"{root} holds shards but no order.json: they were written in source order, and this job asks for "
                 "10 source rows shuffled with --shuffle-seed 0; pass --no-shuffle to continue this cache, or write "
                 "to a new cache directory")
    with pytest.raises(ShardstoreError, match=f"^{re.escape(unordered)}$"):
        write_image_folder(root, folder, image_size=8, shard_size=4, fsync=False)
    assert cli(["write", root, "--from-folder", folder, "--image-size", 8, "--shard-size", 4], capsys) == unordered
    assert not (root / "order.json").exists()
    message = (f"{root / 'shard_000002'} has no ids.npy: an image ingest resumes after the last source row its "
               "shards record, so it cannot continue a cache written without ids; write the images to a new cache "
               "directory")
    with pytest.raises(ShardstoreError, match=f"^{re.escape(message)}$"):
        write_image_folder(root, folder, image_size=8, shard_size=4, shuffle_seed=None, fsync=False)
    assert cli(["write", root, "--from-folder", folder, "--image-size", 8, "--shard-size", 4, "--no-shuffle"],
               capsys) == message


DAMAGE = {
    "past the end": lambda ids: ids + 100,
    "negative": lambda ids: ids - 100,
    "not increasing": lambda ids: ids[::-1].copy(),
    "repeated id": lambda ids: ids[[0, 1, 2, 2]],
    "float": lambda ids: ids.astype(np.float64),
}


@pytest.mark.parametrize("shuffled", [True, False], ids=["shuffled", "source-order"])
@pytest.mark.parametrize("damage", [*DAMAGE, "before the job"])
def test_damaged_ids_stop_a_resumed_folder_ingest(tmp_path: Path, capsys: pytest.CaptureFixture, damage: str,
                                                  shuffled: bool) -> None:
    folder = make_folder(tmp_path / "imgs")
    root = tmp_path / "c"
    seed, flags = (0, []) if shuffled else (None, ["--no-shuffle"])
    # The second job's shard 1 (rows at positions 4..7 of the order) is the one damaged.
    write_image_folder(root, folder, image_size=8, shard_size=4, start_shard=1, num_shards=1, shuffle_seed=seed,
                       fsync=False)
    ids_path = root / "shard_000001" / "ids.npy"
    ids = np.load(ids_path)
    if damage == "before the job":  # rows from positions 0..3, which belong to the job owning shard 0
        from shardstore.store.order import source_order

        np.save(ids_path, source_order(10, seed)[:4])
    else:
        np.save(ids_path, DAMAGE[damage](ids))
    fix = f"an image ingest resumes after the last source row recorded there; delete {root / 'shard_000001'}"
    with pytest.raises(ShardstoreError, match=rf"^{re.escape(str(ids_path))}: damaged \(.*\); {re.escape(fix)}"):
        write_image_folder(root, folder, image_size=8, shard_size=4, start_shard=1, shuffle_seed=seed, fsync=False)
    line = cli(["write", root, "--from-folder", folder, "--image-size", 8, "--shard-size", 4, "--start-shard", 1,
                *flags], capsys)
    assert line.startswith(f"{ids_path}: damaged (") and fix in line
    # nothing written, nothing lost
    assert sorted(p.name for p in root.iterdir()) == ["classes.json", "order.json", "shard_000001"]


def test_a_truncated_ids_file_is_one_line(started: tuple[Path, Path]) -> None:
    folder, root = started
    ids_path = root / "shard_000000" / "ids.npy"
    ids_path.write_bytes(ids_path.read_bytes()[:-8])  # the header still promises 4 ids
    with pytest.raises(ShardstoreError, match=rf"^{re.escape(str(ids_path))}: unreadable \(.*\); an image ingest"):
        write_image_folder(root, folder, image_size=8, shard_size=4, fsync=False)


def test_the_fix_for_damaged_ids_works(started: tuple[Path, Path]) -> None:
    folder, root = started
    np.save(root / "shard_000000" / "ids.npy", np.arange(100, 104))
    with pytest.raises(ShardstoreError, match="damaged"):
        write_image_folder(root, folder, image_size=8, shard_size=4, fsync=False)
    for f in (root / "shard_000000").iterdir():  # delete the shard, as the message says
        f.unlink()
    (root / "shard_000000").rmdir()
    report = write_image_folder(root, folder, image_size=8, shard_size=4, fsync=False)
    assert report.samples_written == 10


def test_a_finished_job_resumes_to_nothing_without_error(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "imgs")
    write_image_folder(tmp_path / "c", folder, image_size=8, shard_size=4, fsync=False)
    report = write_image_folder(tmp_path / "c", folder, image_size=8, shard_size=4, fsync=False)
    assert report.samples_already_written == 10 and report.samples_written == 0


# --- sizes no machine can hold -----------------------------------------------------------------------------------


def test_a_huge_shard_size_is_refused_with_the_memory_it_needs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pattern = (r"^shard_size 1,000,000,000,000,000 with (\d[\d,]*) bytes per sample needs [\d,.]+ [KMGTP]?B of memory "
               r"for one shard's buffer, more than this machine's [\d,.]+ \w+; choose a smaller shard_size \(at most "
               r"[\d,]+ here; 2048 is usual\)$")
    with pytest.raises(WriterError, match=pattern):
        ShardWriter(tmp_path / "w", 10**15).add({"x": np.zeros(3, np.float32)})
    np.save(tmp_path / "images.npy", np.zeros((10, 3, 8, 8), np.uint8))
    line = cli(["write", tmp_path / "c", "--from-npy", f"images={tmp_path / 'images.npy'}", "--shard-size", 10**15],
               capsys)
    assert re.match(pattern, line) and re.match(pattern, line)[1] == "200"  # 192 image bytes and an 8-byte id
    folder = make_folder(tmp_path / "imgs")
    line = cli(["write", tmp_path / "d", "--from-folder", folder, "--shard-size", 10**15], capsys)
    assert re.match(pattern, line) and re.match(pattern, line)[1] == f"{3 * 64 * 64 + 16:,}"


def test_a_sample_larger_than_memory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(WriterError, match=r"^one sample of [\d,.]+ \w+ is too large for this machine's [\d,.]+ \w+ of "
                                          r"memory; store smaller samples$"):
        # A broadcast view: a petabyte-sized sample that takes no memory to describe.
        ShardWriter(tmp_path / "w", 4).add({"x": np.broadcast_to(np.uint8(0), (10**8, 10**7))})


def test_an_impossible_image_size_is_refused_before_any_image_is_read(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    folder = make_folder(tmp_path / "imgs")
    decoded = []
    monkeypatch.setattr(decode, "load_image", lambda path, size: decoded.append(path) or np.zeros((3, 1, 1)))
    message = ("image size 100,000 makes 10,000,000,000-pixel images, more than Pillow decodes (89,478,485 pixels); "
               "choose an image size of at most 9,459 (e.g. 64 or 224)")
    with pytest.raises(ShardstoreError, match=f"^{re.escape(message)}$"):
        write_image_folder(tmp_path / "c", folder, image_size=100_000, shard_size=4, fsync=False)
    assert cli(["write", tmp_path / "c", "--from-folder", folder, "--image-size", 100_000], capsys) == message
    # Below Pillow's limit but not in memory: the shard's buffer is what cannot be held.
    line = cli(["write", tmp_path / "c", "--from-folder", folder, "--image-size", 9000, "--shard-size", 10**6], capsys)
    assert line.startswith("shard_size 1,000,000 with 243,000,016 bytes per sample needs")
    assert decoded == [] and not (tmp_path / "c").exists()


def test_write_arrays_with_a_huge_shard_size_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(WriterError, match="needs .* of memory for one shard's buffer"):
        write_arrays(tmp_path / "c", {"x": np.zeros((5, 2))}, shard_size=10**15, fsync=False)
    assert list((tmp_path / "c").iterdir()) == []
