"""write_atomic / write_bytes_atomic: a reader or a crash never sees a partial file; a full disk is one line."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shardstore.errors import DiskFullError
from shardstore.store import atomic
from shardstore.store.atomic import remove_stale_temporaries, write_atomic, write_bytes_atomic

OLD = b"old complete content\n" * 50
NEW = b"new complete content!\n" * 80


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


@pytest.fixture
def target(tmp_path: Path) -> Path:
    path = tmp_path / "manifest.json"
    path.write_bytes(OLD)
    return path


class _FailingFile:
    """An open file whose writes stop after ``budget`` bytes with ``error``, as a crash or a full disk would."""

    def __init__(self, f, budget: int, error: OSError) -> None:
        self._f, self._budget, self._error = f, budget, error

    def write(self, data) -> int:
        data = bytes(data)
        if len(data) > self._budget:
            self._f.write(data[: self._budget])
            self._f.flush()
            raise self._error
        self._budget -= len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()


def _failing_open(monkeypatch: pytest.MonkeyPatch, budget: int, error: OSError) -> list[str]:
    """Make every file the atomic writer opens fail after ``budget`` bytes; returns the names it opened."""
    opened: list[str] = []

    def fake_open(path, mode="r", *args, **kwargs):
        opened.append(os.fspath(path))
        f = open(path, mode, *args, **kwargs)
        return _FailingFile(f, budget, error) if "w" in mode or "a" in mode or "+" in mode else f

    monkeypatch.setattr(atomic, "open", fake_open, raising=False)
    monkeypatch.setattr(Path, "write_bytes", lambda self, data: fake_open(self, "wb").write(data))
    return opened


def test_a_reader_holding_the_old_file_never_sees_the_new_bytes(target: Path) -> None:
    # Written in place, the reader's open file would change under it (and could be read half-written).
    with open(target, "rb") as reader:
        inode = os.fstat(reader.fileno()).st_ino
        write_bytes_atomic(target, NEW)
        assert reader.read() == OLD
    assert target.read_bytes() == NEW and target.stat().st_ino != inode
    assert leftovers(target.parent) == []


def test_write_bytes_failing_midway_keeps_the_old_file(target: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opened = _failing_open(monkeypatch, 100, OSError(errno.EIO, "Input/output error"))
    with pytest.raises(OSError, match="Input/output error"):
        write_bytes_atomic(target, NEW)
    monkeypatch.undo()
    assert opened and str(target) not in opened  # only the temporary was opened for writing
    assert target.read_bytes() == OLD and leftovers(target.parent) == []


def test_write_atomic_failing_midway_keeps_the_old_file(target: Path) -> None:
    def half_then_crash(f) -> None:
        f.write(NEW[:50])
        raise RuntimeError("killed while writing")

    with pytest.raises(RuntimeError, match="killed while writing"):
        write_atomic(target, half_then_crash)
    assert target.read_bytes() == OLD and leftovers(target.parent) == []


def test_new_file_is_not_created_by_a_failed_write(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_atomic(tmp_path / "latest.json", lambda f: (f.write(b"{"), int("x")))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_disk_full_is_one_line_and_keeps_the_old_file(target: Path, monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    _failing_open(monkeypatch, 64, OSError(code, os.strerror(code)))
    with pytest.raises(DiskFullError) as info:
        write_bytes_atomic(target, NEW)
    monkeypatch.undo()
    line = str(info.value)
    assert "\n" not in line
    assert line.startswith(f"no space left on device: writing {target} needs 1.8 KB")  # len(NEW) == 1,760
    assert line.endswith("nothing was replaced")
    assert target.read_bytes() == OLD and leftovers(target.parent) == []


def test_disk_full_in_write_atomic_names_the_size_hint(target: Path) -> None:
    def full(f) -> None:
        f.write(b"x" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError, match=r"writing .*manifest.json needs 5.0 MB(, [\d,.]+ \w+ free)?; free space"):
        write_atomic(target, full, size_hint=5_000_000)
    assert target.read_bytes() == OLD and leftovers(target.parent) == []


@pytest.mark.parametrize(("free", "shown"), [(1_200_000, True), (6_000_000, False)])
def test_disk_full_shows_the_free_space_only_when_it_explains_the_failure(target: Path, monkeypatch: pytest.MonkeyPatch,
                                                                         free: int, shown: bool) -> None:
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**9, 10**9 - free, free))

    def full(f) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError) as info:
        write_atomic(target, full, size_hint=5_000_000)
    assert ("needs 5.0 MB, 1.2 MB free;" in str(info.value)) is shown
    assert "needs 5.0 MB" in str(info.value)


def test_remove_stale_temporaries_only_of_dead_writers(tmp_path: Path) -> None:
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout)
    names = {
        f".manifest.json.tmp-{dead}-00ff": False,  # dead writer: removed
        f".manifest.json.tmp-{os.getpid()}-00ff": True,  # live writer: kept
        f".latest.json.tmp-{dead}-00ff": True,  # another file's, when a name is given
        "manifest.json": True,
        f"manifest.json.tmp-{dead}-00ff": True,  # not hidden: not a temporary of ours
    }
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "target").write_bytes(b"y")
    (tmp_path / f".manifest.json.tmp-{dead}-abcd").symlink_to(tmp_path / "target")  # never followed or removed
    assert remove_stale_temporaries(tmp_path, "manifest.json") == 1
    assert {n: (tmp_path / n).exists() for n in names} == names
    assert (tmp_path / "target").read_bytes() == b"y"
    assert remove_stale_temporaries(tmp_path) == 1  # without a name: every dead writer's
    assert not (tmp_path / f".latest.json.tmp-{dead}-00ff").exists()
