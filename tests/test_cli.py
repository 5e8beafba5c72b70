"""The command line: summaries, exit codes, and user errors as one line with exit code 2 and no traceback."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shardstore.cli import main
from tests.conftest import sample_arrays


def row(key: str, value: str, out: str) -> bool:
    """True if a summary table has a row ``key | value``."""
    return re.search(rf"│ {key}\s*│ {value}\s", out) is not None


def run(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["build-manifest", "{tmp}/missing"], "missing does not exist; pass the cache directory"),
        (["build-manifest", "{tmp}/file"], "file is not a directory; pass the cache directory"),
        (["build-manifest", "{tmp}/empty"], "no shards in"),
        (["build-manifest", "{tmp}/empty", "--bogus"], "No such option: --bogus"),
        (["build-manifest"], "Missing argument"),
        (["frobnicate"], "No such command"),
        (["info", "{tmp}/empty"], "manifest.json does not exist; run `shardstore build-manifest"),
        (["verify", "{tmp}/missing"], "does not exist"),
        (["write", "{tmp}/out"], "give either --from-npy FIELD=PATH"),
        (["write", "{tmp}/out", "--from-npy", "images"], "is not FIELD=PATH"),
        (["write", "{tmp}/out", "--from-npy", "x={tmp}/nope.npy"], "nope.npy: no such file"),
        (["write", "{tmp}/out", "--from-folder", "{tmp}/empty"], "has no class subfolders"),
        (["write", "{tmp}/out", "--from-folder", "{tmp}/empty", "--on-error", "maybe"], "must be 'skip' or 'stop'"),
        (["write", "{tmp}/out", "--from-folder", "{tmp}/empty", "--shard-size", "x"], "Invalid value"),
    ],
)
def test_user_errors_are_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture, args, message) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    code, out, err = run([a.format(tmp=tmp_path) for a in args], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shardstore: error: "), err
    assert message in lines[0]
    assert "Traceback" not in err + out


@pytest.mark.slow
def test_real_process_prints_no_traceback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "shardstore", "build-manifest", str(tmp_path / "missing")],
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"shardstore: error: {tmp_path / 'missing'} does not exist; pass the cache directory"]


def test_write_from_npy_then_info_and_verify(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = sample_arrays(10)
    args = []
    for name, arr in data.items():
        np.save(tmp_path / f"{name}.npy", arr)
        args += ["--from-npy", f"{name}={tmp_path / name}.npy"]
    code, out, _ = run(["write", str(tmp_path / "c"), *args, "--shard-size", "4"], capsys)
    assert code == 0
    assert "wrote 3 shard(s), 10 samples" in out
    assert row("samples", "10", out) and row("images", r"uint8\s*│\s*\[2, 3, 4\]", out)

    code, out, _ = run(["build-manifest", str(tmp_path / "c"), "--checksum"], capsys)
    assert code == 0 and "12 of 12 files" in out and "checksummed: 12" in out
    code, out, _ = run(["info", str(tmp_path / "c")], capsys)
    assert code == 0 and row("shards", "3", out) and row("ids", r"int64\s*│\s*\[\]", out)
    code, out, _ = run(["verify", str(tmp_path / "c")], capsys)
    assert code == 0 and "checked 12 files" in out and "0 bad" in out

    with open(tmp_path / "c" / "shard_000001" / "labels.npy", "r+b") as f:
        f.seek(-1, 2)
        f.write(b"\x7f")  # same size, different bytes: only a checksum can tell
    code, out, err = run(["verify", str(tmp_path / "c")], capsys)
    assert code == 1 and "mismatch: shard_000001/labels.npy: checksum mismatch" in err and "1 bad" in out


def test_verify_without_checksums_says_how(tmp_path: Path, capsys: pytest.CaptureFixture, native_cache: Path) -> None:
    assert run(["build-manifest", str(native_cache)], capsys)[0] == 0
    code, _, err = run(["verify", str(native_cache)], capsys)
    assert code == 2 and "has no checksums; run `shardstore build-manifest --checksum" in err


def test_build_manifest_reports_left_out_and_strict(native_cache: Path, capsys: pytest.CaptureFixture) -> None:
    (native_cache / "shard_000001" / "feats.npy").unlink()
    code, out, err = run(["build-manifest", str(native_cache)], capsys)
    assert code == 0
    assert err.strip().splitlines() == [
        "left out: shard_000001/feats.npy: field 'feats' is missing (the other shards have it); the shard is left out"
    ]
    assert row("left out", r"1 shard\(s\)", out)
    code, _, _ = run(["build-manifest", str(native_cache), "--strict"], capsys)
    assert code == 1


def test_a_changed_checksummed_file_is_reported_by_build_and_verify(native_cache: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    assert run(["build-manifest", str(native_cache), "--checksum"], capsys)[0] == 0
    path = native_cache / "shard_000001" / "labels.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size, new content
    path.write_bytes(bytes(data))
    code, _, err = run(["build-manifest", str(native_cache), "--strict"], capsys)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("changed: shard_000001/labels.npy: ") and "--full --checksum" in lines[0]
    assert run(["build-manifest", str(native_cache)], capsys)[0] == 0
    assert run(["verify", str(native_cache)], capsys)[0] == 1  # the checksum survived both rebuilds


def test_build_manifest_all_bad_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "images_000000.npy").write_bytes(b"junk")
    code, _, err = run(["build-manifest", str(tmp_path)], capsys)
    assert code == 2 and err.strip().splitlines()[-1].startswith("shardstore: error: no usable shards")


@pytest.mark.slow
def test_demo_trains_a_teacher_and_both_students(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run(["demo", str(tmp_path / "d"), "--seeds", "1", "--teacher-epochs", "1", "--student-epochs", "1"],
                       capsys)
    assert code == 0, out
    assert "teacher resnet20" in out and "labels only" in out and "distilled, cached 10 views" in out
    assert (tmp_path / "d" / "cache" / "manifest.json").exists() and (tmp_path / "d" / "teacher.pt").exists()
    assert (tmp_path / "d" / "cache" / "teacher.fields.json").exists()
    assert sorted(p.name for p in (tmp_path / "d" / "runs").iterdir()) == [
        "distilled_cached_10_views_seed0", "distilled_seed0", "labels_only_seed0", "teacher"]


def test_paths_are_printed_literally(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "a:x:[b]c [bold]d[/bold] :thumbs_up:"  # rich would show an emoji and eat the tags
    np.save(tmp_path / "labels.npy", np.arange(5))
    code, out, _ = run(["write", str(root), "--from-npy", f"labels={tmp_path / 'labels.npy'}", "--shard-size", "4"],
                       capsys)
    assert code == 0
    assert f"cache {root}\n" in out and f"wrote {root / 'manifest.json'} (" in out
    code, out, _ = run(["info", str(root)], capsys)
    assert code == 0 and f"cache {root}\n" in out and "❌" not in out and "👍" not in out
    code, _, err = run(["verify", str(root / "missing")], capsys)
    assert code == 2 and f"{root / 'missing'} does not exist" in err
