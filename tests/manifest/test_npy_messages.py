""".npy files that are not what they claim: each named for what it is, in one line, never with advice to unpickle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shardstore.cli import main
from shardstore.errors import ShardstoreError
from shardstore.store.npy import NotNpyError, open_npy, read_header_bytes


def _files(tmp_path: Path) -> dict[str, Path]:
    files = {name: tmp_path / f"{name}.npy" for name in ("empty", "text", "objects", "short", "good")}
    files["empty"].write_bytes(b"")
    files["text"].write_text("id,label\n1,cat\n2,dog\n")
    np.save(files["objects"], np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    np.save(files["short"], np.arange(100, dtype=np.int64))
    files["short"].write_bytes(files["short"].read_bytes()[:300])
    np.save(files["good"], np.arange(6, dtype=np.int16).reshape(3, 2))
    return files


EXPECTED = {
    "empty": r"empty\.npy: empty file \(0 bytes\); pass a file written by numpy\.save$",
    "text": r"text\.npy: not an \.npy file \(it starts with b'id,label', not the \.npy magic .*\); pass a file",
    "objects": r"objects\.npy: dtype object holds Python objects, which are never loaded \(no pickle\); save a numeric",
    "short": r"short\.npy: header promises 928 bytes, file has 300 \(truncated\); write the file again$",
}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_open_npy_names_what_the_file_is(tmp_path: Path, kind: str) -> None:
    with pytest.raises(ShardstoreError, match=EXPECTED[kind]) as info:
        open_npy(_files(tmp_path)[kind])
    assert "allow_pickle" not in str(info.value) and "\n" not in str(info.value)


def test_open_npy_maps_a_good_file_read_only(tmp_path: Path) -> None:
    arr = open_npy(_files(tmp_path)["good"])
    assert arr.shape == (3, 2) and not arr.flags.writeable and arr[2, 1] == 5


def test_header_parser_tells_not_npy_from_damaged() -> None:
    with pytest.raises(NotNpyError, match=r"^empty file \(0 bytes\)$"):
        read_header_bytes(b"")
    with pytest.raises(NotNpyError, match="not an .npy file"):
        read_header_bytes(b"PK\x03\x04zip!")
    with pytest.raises(ValueError, match="unsupported .npy format version 9.0") as info:
        read_header_bytes(b"\x93NUMPY\x09\x00")
    assert not isinstance(info.value, NotNpyError)


@pytest.mark.parametrize("kind", ["empty", "text", "objects"])
def test_write_from_npy_says_what_the_input_is(tmp_path: Path, capsys: pytest.CaptureFixture, kind: str) -> None:
    path = _files(tmp_path)[kind]
    code = main(["write", str(tmp_path / "out"), "--from-npy", f"images={path}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert {"empty": "empty file (0 bytes)", "text": "not an .npy file", "objects": "never loaded"}[kind] in err
    assert "interrupted" not in err and "allow_pickle" not in err and "unsafely" not in err
