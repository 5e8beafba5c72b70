"""A full disk while shards are written: one ``DiskFullError`` line naming the shard and the space it needed,
no part of the shard left behind, the shards written before it intact; the CLI says it in one line, exit 2."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shardstore import ShardWriter
from shardstore.cli import main
from shardstore.errors import DiskFullError
from shardstore.store import writer as writer_module
from tests.conftest import sample_arrays


def fail_on_call(monkeypatch: pytest.MonkeyPatch, number: int, code: int = errno.ENOSPC) -> None:
    """Make the ``number``-th ``.npy`` file write (1-based) fail as a full disk does, after writing a little."""
    real = writer_module.write_npy
    calls = []

    def write_npy(f, array):
        calls.append(1)
        if len(calls) == number:
            f.write(b"\x93NUMPY partial")
            raise OSError(code, os.strerror(code))
        return real(f, array)

    monkeypatch.setattr(writer_module, "write_npy", write_npy)


def shard_names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EFBIG], ids=["ENOSPC", "EDQUOT", "EFBIG"])
def test_a_full_disk_is_one_line_and_leaves_no_partial_shard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             code: int) -> None:
    root = tmp_path / "c"
    data = sample_arrays(10)
    fail_on_call(monkeypatch, 5, code)  # shard 0 has three fields; the second field of shard 1 fails
    with pytest.raises(DiskFullError, match=rf"^no space left on device: writing {root}/shard_000001 needs 536 "
                                            r"bytes(, [\d,.]+ \w+ free)?; free space on that file system") as exc:
        with ShardWriter(root, 4, fsync=False) as writer:
            writer.add_batch(data)
    assert "\n" not in str(exc.value)
    assert shard_names(root) == ["shard_000000"]  # no temporary directory, no shard_000001
    for name, arr in data.items():
        np.testing.assert_array_equal(np.load(root / "shard_000000" / f"{name}.npy"), arr[:4])


@pytest.mark.parametrize("dtype", ["uint8", ">i4", "float16", "bool", "complex64"])
@pytest.mark.parametrize("index", [np.s_[:, 1:], np.s_[0, 0, 0], np.s_[:0]], ids=["strided", "0-d", "empty"])
def test_shard_files_are_what_numpy_writes(tmp_path: Path, dtype: str, index: tuple) -> None:
    array = np.arange(24).reshape(2, 3, 4).astype(dtype)[index]  # strided: written in C order all the same
    with open(tmp_path / "a.npy", "wb") as f:
        writer_module.write_npy(f, array)
    np.save(tmp_path / "b.npy", array)
    assert (tmp_path / "a.npy").read_bytes() == (tmp_path / "b.npy").read_bytes()


def test_other_write_errors_are_not_called_a_full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fail_on_call(monkeypatch, 1, errno.EIO)
    with pytest.raises(OSError, match="Input/output error") as exc:
        with ShardWriter(tmp_path / "c", 4, fsync=False) as writer:
            writer.add_batch(sample_arrays(4))
    assert not isinstance(exc.value, DiskFullError)
    assert shard_names(tmp_path / "c") == []


def npy_inputs(folder: Path, n: int, side: int = 8) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    np.save(folder / "images.npy", rng.integers(0, 255, (n, 3, side, side), dtype=np.uint8))
    np.save(folder / "labels.npy", np.arange(n, dtype=np.int64) % 10)
    return ["--from-npy", f"images={folder / 'images.npy'}", "--from-npy", f"labels={folder / 'labels.npy'}"]


def test_cli_write_on_a_full_disk_is_one_line_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture) -> None:
    args = npy_inputs(tmp_path / "in", 10)
    fail_on_call(monkeypatch, 4)  # shard 0 has images, labels and ids; shard 1 fails
    code = main(["write", str(tmp_path / "c"), *args, "--shard-size", "4"])
    captured = capsys.readouterr()
    assert code == 2 and "Traceback" not in captured.err
    lines = captured.err.strip().splitlines()
    # 4 samples x (192 image bytes + 8 + 8) and three 128-byte headers: 1,216 bytes
    assert len(lines) == 1 and lines[0].startswith(
        f"shardstore: error: no space left on device: writing {tmp_path / 'c' / 'shard_000001'} needs 1.2 KB")
    assert shard_names(tmp_path / "c") == ["shard_000000"]


@pytest.mark.parametrize("chained", [False, True])
def test_cli_turns_any_remaining_disk_full_error_into_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture, chained: bool) -> None:
    from shardstore.cli import manifest as cli

    def full(*args, **kwargs):
        error = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "manifest.json"))
        if not chained:
            raise error
        try:
            raise error
        except OSError as exc:
            raise RuntimeError("the writer failed") from exc

    monkeypatch.setattr(cli, "build_manifest", full)
    (tmp_path / "c").mkdir()
    assert main(["build-manifest", str(tmp_path / "c")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"shardstore: error: no space left on device: writing {tmp_path / 'manifest.json'} needs more space")


# --- a real full file system -------------------------------------------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    """A 1 MiB tmpfs (needs root, or the capability to mount); skipped with the reason where it cannot be mounted."""
    mount = tmp_path / "small"
    mount.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command to create a small tmpfs")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {' '.join((proc.stderr or proc.stdout).split())}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def image_folder(folder: Path, n: int) -> list[str]:
    rng = np.random.default_rng(0)
    for i in range(n):
        (folder / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"class{i % 2}" / f"{i:03d}.png")
    return ["--from-folder", str(folder), "--image-size", "40", "--no-shuffle"]  # ids below: source order


@pytest.mark.slow
@pytest.mark.parametrize("source", ["npy", "folder"])
def test_write_into_a_full_tmpfs(small_tmpfs: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                 source: str) -> None:
    root = small_tmpfs / "cache"
    # About 2 MB of samples, 200 KB per shard, onto 1 MiB.
    args = npy_inputs(tmp_path / "in", 400, side=32) if source == "npy" else image_folder(tmp_path / "imgs", 400)
    code = main(["write", str(root), *args, "--shard-size", "64"])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2 and len(lines) == 1, captured.err
    assert lines[0].startswith(f"shardstore: error: no space left on device: writing {root}/shard_0000")
    side = 32 if source == "npy" else 40
    assert f"needs {64 * (3 * side * side + 16) + 3 * 128:,}"[:-4] in lines[0] and "Traceback" not in captured.err
    written = shard_names(root)
    assert written and all(name.startswith("shard_") for name in written if not name.endswith(".json"))
    shards = [name for name in written if name.startswith("shard_")]
    assert shards == [f"shard_{i:06d}" for i in range(len(shards))]  # no temporary, no partial shard
    for i, name in enumerate(shards):  # every shard that became visible is whole
        ids = np.load(root / name / "ids.npy")
        assert ids.tolist() == list(range(64 * i, 64 * (i + 1)))
        assert np.load(root / name / "images.npy").shape == (64, 3, side, side)
