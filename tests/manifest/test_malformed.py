"""Malformed manifest values: one line naming the file and the fix (exit 2), and build-manifest recovers from them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from shardstore import ManifestError, ShardStore, build_manifest
from shardstore.cli import main
from shardstore.manifest.model import Manifest
from tests.conftest import sample_arrays

LABELS = '"path": "shard_000000/labels.npy"'


def _replace(old: str, new: str):
    def edit(text: str) -> str:
        assert old in text
        return text.replace(old, new, 1)
    return edit


def _doc(change):
    def edit(text: str) -> str:
        doc = json.loads(text)
        change(doc)
        return json.dumps(doc)
    return edit


def _labels(doc: dict) -> dict:
    return doc["shards"][0]["files"]["labels"]


# (edit of the manifest text, what the one line says)
CASES = {
    "float overflow": (_replace('"bytes": 160', '"bytes": 1e400'), r"bytes inf is not an integer"),
    "float": (_replace('"num_samples": 4', '"num_samples": 4.0'), r"num_samples 4.0 is not an integer"),
    "deep nesting": (lambda t: "[" * 100_000 + "]" * 100_000, r"nested too deeply to be a manifest"),
    "deep nesting inside": (_replace('"left_out": []', '"left_out": ' + "[" * 100_000 + "]" * 100_000),
                            r"nested too deeply|malformed entry"),
    "5000 digits": (_replace('"bytes": 160', '"bytes": ' + "7" * 5000), r"not valid JSON \(Exceeds the limit"),
    "5000-digit shard id": (_replace('"id": 0', '"id": ' + "7" * 5000), r"not valid JSON"),
    "NUL in path": (_replace(LABELS, '"path": "shard_000000/lab\\u0000els.npy"'), r"holds a NUL byte"),
    "negative offset": (_doc(lambda d: _labels(d).update(data_offset=-8)), r"data_offset -8 is not an integer in \[0,"),
    "negative rows": (_doc(lambda d: d["shards"][0].update(num_samples=-5)), r"num_samples -5 is not an integer"),
    "shard id 2^63": (_doc(lambda d: d["shards"][-1].update(id=2**63 + 5)), r"shard id 9223372036854775813 is not"),
    "bool as int": (_doc(lambda d: _labels(d).update(bytes=True)), r"bytes True is not an integer"),
    "string shape": (_doc(lambda d: d["fields"]["feats"].update(shape="3")), r"shape '3', not a list of sizes"),
    "huge dtype": (_doc(lambda d: d["fields"]["feats"].update(dtype="U99999999999999")), r"which is not allowed"),
    "void dtype": (_doc(lambda d: d["fields"]["feats"].update(dtype="V0")), r"which is not allowed"),
    "subarray dtype": (_doc(lambda d: d["fields"]["feats"].update(dtype="(2,)f2")), r"not allowed"),
    "bad checksum": (_doc(lambda d: _labels(d).update(checksum="md5:x")), r"checksum 'md5:x' is not sha256"),
    "swapped paths": (_doc(lambda d: _labels(d).update(path="shard_000001/labels.npy")),
                      r"is not where field 'labels' of native shard 0 lives"),
    "wrong field file": (_doc(lambda d: _labels(d).update(path="shard_000000/feats.npy")), r"is not where field"),
    "unknown layout": (_doc(lambda d: d["shards"][0].update(layout="zip")), r"layout 'zip', not 'native' or 'flat'"),
    "shards not a list": (_doc(lambda d: d.update(shards={"a": 1})), r"malformed entry|not an object"),
    "files not a dict": (_doc(lambda d: d["shards"][0].update(files=[1])), r"shard 0 files is not an object"),
    "version text": (_doc(lambda d: d.update(version="2")), r"version '2' is not a version number"),
    "left_out reason not text": (_doc(lambda d: d.update(left_out=[{"path": "x", "reason": 5}])), r"is not a string"),
}


def write_case(root: Path, name: str) -> None:
    build_manifest(root, checksum=True)
    edit, _ = CASES[name]
    path = root / "manifest.json"
    path.write_text(edit(path.read_text()))


@pytest.mark.parametrize("name", sorted(CASES))
def test_open_gives_one_line_naming_file_and_fix(native_cache: Path, name: str) -> None:
    write_case(native_cache, name)
    with pytest.raises(ManifestError, match=CASES[name][1]) as info:
        ShardStore.open(native_cache)
    line = str(info.value)
    assert "\n" not in line and len(line) < 600
    assert line.startswith(f"{native_cache / 'manifest.json'}: ")
    assert line.endswith(f"rebuild it with `shardstore build-manifest {native_cache}`")


@pytest.mark.parametrize("name", sorted(CASES))
def test_build_manifest_recovers(native_cache: Path, name: str, caplog: pytest.LogCaptureFixture) -> None:
    write_case(native_cache, name)
    report = build_manifest(native_cache)
    assert "ignoring the existing manifest" in caplog.text
    assert [(s.id, s.num_samples) for s in report.manifest.shards] == [(0, 4), (1, 4), (2, 2)]
    store = ShardStore.open(native_cache)
    for i in (0, 5, 9):
        np.testing.assert_array_equal(store.sample(i)["images"], sample_arrays(10)["images"][i])


@pytest.mark.parametrize("name", ["float overflow", "deep nesting", "5000 digits", "NUL in path", "negative offset",
                                  "shard id 2^63"])
@pytest.mark.parametrize("command", ["info", "verify"])
def test_cli_exit_2_one_line(native_cache: Path, capsys: pytest.CaptureFixture, name: str, command: str) -> None:
    write_case(native_cache, name)
    code = main([command, str(native_cache)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("shardstore: error: ")
    assert "rebuild it with `shardstore build-manifest" in err and "Traceback" not in err


def test_left_out_lines_are_printed_without_control_characters(native_cache: Path) -> None:
    build_manifest(native_cache)
    doc = json.loads((native_cache / "manifest.json").read_text())
    doc["left_out"] = [{"shard_id": 7, "path": "a\nb", "reason": "\x1b[31mred\x1b[0m"}]
    m = Manifest.from_json(json.dumps(doc))
    assert str(m.left_out[0]) == "a?b: ?[31mred?[0m"


def test_shard_id_above_int64_is_left_out_by_build(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "c"
    root.mkdir()
    for shard_id in ("0", "1", str(2**63 + 1), "9" * 200):
        np.save(root / f"labels_{shard_id}.npy", np.arange(3, dtype=np.int64))
    (root / f"shard_{2**64}").mkdir()
    np.save(root / f"shard_{2**64}" / "labels.npy", np.arange(3, dtype=np.int64))
    report = build_manifest(root)
    assert [s.id for s in report.manifest.shards] == [0, 1]
    assert len(report.problems) == 3
    assert all("is larger than 9,223,372,036,854,775,807 (ids are 64-bit); rename it" in p.reason
               for p in report.problems)
    assert ShardStore.open(root).num_samples == 6
    assert main(["info", str(root)]) == 0
