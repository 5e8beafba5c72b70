"""``kernels.read_heads`` agrees with a plain Python loop of the same system calls, and a build that reads
through it finds what a file-by-file read finds: value ranges beyond the bytes read, headers longer than
them, files that change between two reads, links and FIFOs."""

from __future__ import annotations

import errno
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardstore import ShardWriter, build_manifest, kernels
from shardstore.manifest import bulk

FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def reference(dir_fd: int, paths: list[bytes], width: int, offset: int = 0) -> list[tuple]:
    """The spec: per path (errno, size, mtime_ns, mode, ino, ctime_ns, bytes read), one file at a time in Python."""
    out = []
    for path in paths:
        try:
            if width == 0:
                st_ = os.stat(path, dir_fd=dir_fd, follow_symlinks=False)
                data = b""
            else:
                fd = os.open(path, FLAGS, dir_fd=dir_fd)
                try:
                    st_ = os.fstat(fd)
                    data = os.pread(fd, width, offset) if stat.S_ISREG(st_.st_mode) else b""
                finally:
                    os.close(fd)
        except OSError as exc:
            out.append((exc.errno, 0, 0, 0, 0, 0, b""))
            continue
        out.append((0, st_.st_size, st_.st_mtime_ns, st_.st_mode, st_.st_ino, st_.st_ctime_ns, data))
    return out


def compiled(dir_fd: int, paths: list[bytes], width: int, offset: int = 0) -> list[tuple]:
    h = kernels.read_heads(dir_fd, paths, width, offset)
    assert h.heads.shape == (len(paths), width)
    return [(int(h.errno[i]), int(h.size[i]), int(h.mtime_ns[i]), int(h.mode[i]), int(h.ino[i]),
             int(h.ctime_ns[i]), h.heads[i, : h.read[i]].tobytes()) for i in range(len(paths))]


@pytest.fixture
def tree(tmp_path: Path) -> tuple[int, list[bytes]]:
    """A directory of every kind of entry a cache root may hold, open as a descriptor."""
    root = tmp_path / "root"
    (root / "shard_000001").mkdir(parents=True)
    for size in (0, 1, 9, 10, 127, 128, 255, 256, 257, 5000):
        (root / f"f{size}.bin").write_bytes(bytes((i * 7 + size) % 256 for i in range(size)))
    np.save(root / "shard_000001" / "images.npy", np.arange(12, dtype=np.uint8).reshape(4, 3))
    (root / "inside_link.npy").symlink_to(root / "f128.bin")
    (root / "dir_link").symlink_to(root / "shard_000001")
    (root / "outside_link.npy").symlink_to("/etc/hostname")
    os.mkfifo(root / "fifo.npy")
    (root / "not_a_dir").write_bytes(b"x")
    names = [p.name.encode() for p in sorted(root.iterdir())]
    names += [b"shard_000001/images.npy", b"dir_link/images.npy", b"missing.npy", b"not_a_dir/x.npy",
              b"shard_000001", b"", b"a" * 300, "é.npy".encode()]
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    yield fd, names
    os.close(fd)


@pytest.mark.parametrize("width,offset", [(0, 0), (1, 0), (10, 0), (128, 0), (256, 0), (256, 100), (64, 5000)])
def test_every_kind_of_entry_matches_the_python_loop(tree: tuple[int, list[bytes]], width: int, offset: int) -> None:
    fd, names = tree
    assert compiled(fd, names, width, offset) == reference(fd, names, width, offset)


def test_links_are_not_followed_and_fifos_not_read(tree: tuple[int, list[bytes]]) -> None:
    fd, _ = tree
    got = kernels.read_heads(fd, [b"inside_link.npy", b"outside_link.npy", b"fifo.npy", b"shard_000001"], 256)
    assert got.errno.tolist() == [errno.ELOOP, errno.ELOOP, 0, 0]  # a link in the last component: refused
    assert stat.S_ISFIFO(int(got.mode[2])) and stat.S_ISDIR(int(got.mode[3]))
    assert got.read.tolist() == [0, 0, 0, 0] and got.regular().tolist() == [False] * 4
    assert not got.heads.any()


def test_a_path_too_long_is_an_errno_not_a_crash(tree: tuple[int, list[bytes]]) -> None:
    fd, _ = tree
    got = kernels.read_heads(fd, [b"x/" * 3000, b"f9.bin"], 16)
    assert got.errno.tolist() == [errno.ENAMETOOLONG, 0] and got.read.tolist() == [0, 9]


def test_arguments_are_checked(tree: tuple[int, list[bytes]]) -> None:
    fd, _ = tree
    with pytest.raises(TypeError, match="paths must be a list of bytes"):
        kernels.read_heads(fd, ["f9.bin"], 16)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="NUL byte"):
        kernels.read_heads(fd, [b"f9\0.bin"], 16)
    with pytest.raises(ValueError, match="width and offset must be >= 0"):
        kernels.read_heads(fd, [b"f9.bin"], -1)
    empty = kernels.read_heads(fd, [], 16)
    assert len(empty) == 0 and empty.heads.shape == (0, 16)


@pytest.mark.slow  # over 0.3 s
@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(0, 700), min_size=1, max_size=12), width=st.integers(0, 600),
       offset=st.integers(0, 800))
def test_random_files_match_the_python_loop(tmp_path_factory: pytest.TempPathFactory, sizes: list[int], width: int,
                                            offset: int) -> None:
    root = tmp_path_factory.mktemp("random")
    rng = np.random.default_rng(len(sizes) * 1000 + width)
    for i, size in enumerate(sizes):
        (root / f"{i}.npy").write_bytes(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
    names = [f"{i}.npy".encode() for i in range(len(sizes))] + [b"gone.npy"]
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert compiled(fd, names, width, offset) == reference(fd, names, width, offset)
    finally:
        os.close(fd)


# -- a build through it ------------------------------------------------------------------------------------------


def write(root: Path, num_shards: int, shard_size: int, journal: bool = True) -> Path:
    labels = (np.arange(num_shards * shard_size) * 7919) % 1000 - 300
    with ShardWriter(root, shard_size, fsync=False, journal=journal) as w:
        w.add_batch({"images": np.zeros((num_shards * shard_size, 2, 3), np.uint8), "labels": labels})
    return root


def ranges(report) -> list[tuple[int, int]]:
    m = report.manifest
    return [m.value_range(p, "labels") for p in range(m.num_shards)]


def expected_ranges(num_shards: int, shard_size: int) -> list[tuple[int, int]]:
    labels = ((np.arange(num_shards * shard_size) * 7919) % 1000 - 300).reshape(num_shards, shard_size)
    return [(int(lo), int(hi)) for lo, hi in zip(labels.min(1), labels.max(1))]


@pytest.mark.parametrize("shard_size", [4, 100, 3000])  # labels inside the bytes read, beyond them, beyond a page
def test_value_ranges_wherever_the_labels_lie(tmp_path: Path, shard_size: int) -> None:
    root = write(tmp_path / "c", 7, shard_size)
    report = build_manifest(root, write=False)
    assert not report.problems and report.headers_read == 14
    assert ranges(report) == expected_ranges(7, shard_size)
    full = build_manifest(root, incremental=False, write=False)
    assert ranges(full) == expected_ranges(7, shard_size)


def test_a_file_changed_between_the_two_reads_is_read_again_file_by_file(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    root = write(tmp_path / "c", 5, 100)
    calls: list[int] = []
    inner = bulk.read_heads

    def second_read_sees_shard_2_changed(dir_fd: int, paths: list[bytes], width: int, offset: int = 0):
        if offset:  # the labels beyond the bytes read: shard 2's file was rewritten meanwhile
            calls.append(len(paths))
            labels = root / "shard_000002" / "labels.npy"
            np.save(labels, np.full(100, 12345))
        return inner(dir_fd, paths, width, offset)

    monkeypatch.setattr(bulk, "read_heads", second_read_sees_shard_2_changed)
    report = build_manifest(root, write=False)
    assert calls == [5] and not report.problems
    got = ranges(report)
    assert got[2] == (12345, 12345)  # the careful path read the new labels
    assert got[:2] + got[3:] == expected_ranges(5, 100)[:2] + expected_ranges(5, 100)[3:]


def test_a_header_longer_than_the_bytes_read_is_read_whole(tmp_path: Path) -> None:
    root = write(tmp_path / "c", 3, 4)
    deep = np.zeros((4,) + (1,) * 60, np.float32)  # a header of several hundred bytes
    for shard in ("shard_000000", "shard_000001", "shard_000002"):
        np.save(root / shard / "deep.npy", deep)
    assert (root / "shard_000000" / "deep.npy").stat().st_size > bulk.HEAD_WIDTH + 4 * 4
    report = build_manifest(root, incremental=False, write=False)
    assert not report.problems and report.headers_read == 9
    assert report.manifest.fields["deep"].shape == (1,) * 60


def test_shards_read_by_an_earlier_pass_are_not_read_again(tmp_path: Path) -> None:
    """New shards that change a field's dtype make the build discover every shard again: the reads it starts while
    discovering are of the shards it has not read yet."""
    root = write(tmp_path / "c", 2, 4)
    build_manifest(root)
    for shard_id in range(2, 8):  # by hand: a writer refuses a dtype the cache's shards do not have
        shard = root / f"shard_{shard_id:06d}"
        shard.mkdir()
        np.save(shard / "images.npy", np.zeros((4, 2, 3), np.uint8))
        np.save(shard / "labels.npy", np.arange(4, dtype=np.int32))
    report = build_manifest(root)
    assert report.headers_read == 2 + 6 * 2 + 2 * 2  # spot check, the new shards, the old ones once more
    assert [(p.shard_id, p.path) for p in report.problems] == [(0, "shard_000000/labels.npy"),
                                                                (1, "shard_000001/labels.npy")]
    assert report.manifest.ids.tolist() == list(range(2, 8)) and report.manifest.fields["labels"].dtype == np.int32


def test_reads_ahead_are_bounded_and_every_shard_is_sorted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches of one shard, at most one waiting: discovery's batches are sorted as they come, all of them."""
    monkeypatch.setattr(bulk, "CHUNK_FILES", 2)
    monkeypatch.setattr(bulk.Reader, "AHEAD", 1)
    waiting: list[int] = []
    inner = bulk.Reader._start

    def start(self, cands):
        inner(self, cands)
        waiting.append(len(self._batches))

    monkeypatch.setattr(bulk.Reader, "_start", start)
    root = write(tmp_path / "c", 9, 100)
    report = build_manifest(root, write=False)
    assert not report.problems and report.manifest.num_shards == 9 and max(waiting) == 1
    assert ranges(report) == expected_ranges(9, 100)


def replace_keeping_the_journal(shard: Path, make) -> None:
    """Change a file of a shard directory and give the directory back its mtime: the journal still vouches for it."""
    st_ = shard.stat()
    make()
    os.utime(shard, ns=(st_.st_atime_ns, st_.st_mtime_ns))


@pytest.mark.parametrize("journal", [True, False], ids=["vouched", "listed"])
def test_links_and_fifos_in_a_large_root_take_the_careful_path(tmp_path: Path, journal: bool) -> None:
    root = write(tmp_path / "c", 40, 4, journal=journal)
    outside = tmp_path / "secret.npy"
    np.save(outside, np.zeros((4, 2, 3), np.uint8))
    fifo, link, inside = (root / f"shard_{i:06d}" for i in (3, 5, 7))
    replace_keeping_the_journal(fifo, lambda: ((fifo / "labels.npy").unlink(), os.mkfifo(fifo / "labels.npy")))
    replace_keeping_the_journal(link, lambda: ((link / "images.npy").unlink(),
                                               (link / "images.npy").symlink_to(outside)))
    replace_keeping_the_journal(inside, lambda: ((inside / "images.npy").rename(inside / "images.data"),
                                                 (inside / "images.npy").symlink_to("images.data")))
    report = build_manifest(root, write=False)
    problems = {p.shard_id: p.reason for p in report.problems}
    assert sorted(problems) == [3, 5], problems
    assert ("not a regular file" if journal else "'labels' is missing") in problems[3]
    assert f"resolves to {outside}, outside the cache root" in problems[5]
    assert report.manifest.num_shards == 38 and 7 in report.manifest.ids.tolist()


def test_many_distinct_headers_and_header_lengths_are_each_checked_once(tmp_path: Path) -> None:
    """Shards of 1..20 rows (20 distinct headers per field) and a field whose header is longer than the others'."""
    root = tmp_path / "c"
    for shard_id in range(20):
        shard = root / f"shard_{shard_id:06d}"
        shard.mkdir(parents=True)
        rows = shard_id + 1
        np.save(shard / "images.npy", np.full((rows, 2), shard_id, np.uint8))
        np.save(shard / "labels.npy", np.arange(rows) - shard_id)
        np.save(shard / "wide.npy", np.zeros((rows,) + (1,) * 30, np.float32))  # a header of 192 bytes
    assert (root / "shard_000000" / "wide.npy").stat().st_size - 4 > 128
    report = build_manifest(root, write=False)
    m = report.manifest
    assert not report.problems and report.headers_read == 60
    assert m.columns["samples"].tolist() == list(range(1, 21))
    assert [m.value_range(p, "labels") for p in range(20)] == [(-p, 0) for p in range(20)]
    assert m.fields["wide"].shape == (1,) * 30


def test_stats_split_between_two_threads_are_those_of_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from shardstore.manifest import changes

    root = write(tmp_path / "c", 5, 4)
    os.mkfifo(root / "shard_000001" / "fifo.npy")
    paths = [p.encode() for p in ("shard_000000/images.npy", "shard_000001/fifo.npy", "gone.npy", "shard_000002",
                                  "shard_000003/labels.npy", "shard_000004/images.npy", "shard_000004/labels.npy")]
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        one = changes._stat_files(fd, paths)
        monkeypatch.setattr(changes, "STAT_SPLIT", 2)
        two = changes._stat_files(fd, paths)
        dirs = changes._stat_files(fd, paths, kind=stat.S_IFDIR)
    finally:
        os.close(fd)
    assert all(np.array_equal(a, b) for a, b in zip(one, two))
    assert one[0].tolist() == [os.stat(root / p.decode()).st_size if i in (0, 4, 5, 6) else -1
                               for i, p in enumerate(paths)]
    assert dirs[0].tolist() == [-1, -1, -1, (root / "shard_000002").stat().st_size, -1, -1, -1]


def test_names_discovery_cannot_use_leave_the_whole_directories_as_they_were(tmp_path: Path) -> None:
    """An id too large for int64, an id named twice, a link to a shard directory: the rest are found whole."""
    root = write(tmp_path / "c", 6, 4)
    shutil.copytree(root / "shard_000001", root / f"shard_{2**64}")
    shutil.copytree(root / "shard_000002", root / "shard_2")
    (root / "shard_000009").symlink_to(root / "shard_000003")
    report = build_manifest(root, write=False)
    problems = {(p.shard_id, p.path) for p in report.problems}
    assert (None, f"shard_{2**64}") in problems and (2, "shard_2") in problems
    assert report.manifest.ids.tolist() == [0, 1, 3, 4, 5, 9]
    assert ranges(report) == [expected_ranges(6, 4)[i] for i in (0, 1, 3, 4, 5, 3)]


def test_the_cyclic_collector_is_as_it_was_after_a_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gc

    from shardstore.manifest import build

    root = write(tmp_path / "c", 3, 4)
    assert gc.isenabled()
    build_manifest(root, write=False)
    assert gc.isenabled()
    gc.disable()
    try:
        build_manifest(root, write=False)
        assert not gc.isenabled()  # someone else's choice is left alone
    finally:
        gc.enable()

    def fails(*args: object, **kwargs: object) -> None:
        raise OSError("the disk went away")

    monkeypatch.setattr(build, "discover_shards", fails)
    with pytest.raises(OSError, match="the disk went away"):
        build_manifest(root, write=False)
    assert gc.isenabled()


@pytest.mark.parametrize("journal", [True, False], ids=["vouched", "listed"])
def test_many_batches_of_directories_some_vouched_some_listed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              journal: bool) -> None:
    from shardstore.manifest import discover

    monkeypatch.setattr(discover, "WHOLE_BATCH", 3)
    monkeypatch.setattr(bulk, "CHUNK_FILES", 4)
    root = write(tmp_path / "c", 11, 100, journal=journal)
    replace_keeping_the_journal(root / "shard_000004", lambda: None)
    (root / "shard_000007" / "extra.npy").write_bytes(b"")  # its mtime moves: listed even with the journal
    report = build_manifest(root, write=False)
    assert [(p.shard_id, p.path) for p in report.problems] == [(7, "shard_000007/extra.npy")]
    assert report.manifest.ids.tolist() == [i for i in range(11) if i != 7]
    assert ranges(report) == [r for i, r in enumerate(expected_ranges(11, 100)) if i != 7]
