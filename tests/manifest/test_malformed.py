"""Malformed manifest values: one line naming the file and the fix (exit 2), and build-manifest recovers from them.

Format 2 (all JSON, a dict per shard) still opens and is validated as before: its cases write
``to_json()`` to manifest.json and tamper with the shard entries. Format 3 cases tamper with the
header JSON and with the columns of its table.
"""

from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from shardstore import ManifestError, ShardStore, build_manifest
from shardstore.cli import main
from shardstore.store.manifest import Manifest
from tests.conftest import sample_arrays
from tests.manifest.synthetic import column, header, replace_column, table_dir, write_header

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
    """A format-2 manifest.json with case ``name``'s defect (the format-3 table of the build stays beside it)."""
    manifest = build_manifest(root, checksum=True).manifest
    edit, _ = CASES[name]
    (root / "manifest.json").write_text(edit(manifest.to_json()))


def _recovers_params(names) -> list:
    return sorted(names)


@pytest.mark.parametrize("name", sorted(CASES))
def test_open_gives_one_line_naming_file_and_fix(native_cache: Path, name: str) -> None:
    write_case(native_cache, name)
    with pytest.raises(ManifestError, match=CASES[name][1]) as info:
        ShardStore.open(native_cache)
    line = str(info.value)
    assert "\n" not in line and len(line) < 600
    assert line.startswith(f"{native_cache / 'manifest.json'}: ")
    assert line.endswith(f"rebuild it with `shardstore build-manifest {native_cache}`")


@pytest.mark.parametrize("name", _recovers_params(CASES))
@pytest.mark.slow
def test_build_manifest_recovers(native_cache: Path, name: str, caplog: pytest.LogCaptureFixture) -> None:
    write_case(native_cache, name)
    report = build_manifest(native_cache)
    assert "ignoring the existing manifest" in caplog.text
    assert [(s.id, s.num_samples) for s in report.manifest.shards] == [(0, 4), (1, 4), (2, 2)]
    store = ShardStore.open(native_cache, check="all")
    assert store.manifest.format_version == 3
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
    built = build_manifest(native_cache).manifest
    hostile = [{"shard_id": 7, "path": "a\nb", "reason": "\x1b[31mred\x1b[0m"}]
    doc = json.loads(built.to_json())  # format 2
    doc["left_out"] = hostile
    m = Manifest.from_json(json.dumps(doc))
    assert m.format_version == 2 and str(m.left_out[0]) == "a?b: ?[31mred?[0m"
    doc = header(native_cache)  # format 3: the same list in the header
    doc["left_out"] = hostile
    write_header(native_cache, doc)
    m = ShardStore.open(native_cache).manifest
    assert m.format_version == 3 and str(m.left_out[0]) == "a?b: ?[31mred?[0m"


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


# -- format 3: the header JSON ----------------------------------------------------------------------------------


def _feats(doc: dict) -> dict:
    return doc["fields"]["feats"]


HEADER_CASES = {
    "float overflow": (_replace('"num_samples": 10', '"num_samples": 1e400'), r"num_samples inf is not a count"),
    "float": (_replace('"num_shards": 3', '"num_shards": 3.0'), r"num_shards 3.0 is not a count"),
    "deep nesting": (lambda t: "[" * 100_000 + "]" * 100_000, r"nested too deeply to be a manifest"),
    "deep nesting inside": (_replace('"left_out": []', '"left_out": ' + "[" * 100_000 + "]" * 100_000),
                            r"nested too deeply|malformed entry"),
    "5000 digits": (_replace('"num_shards": 3', '"num_shards": ' + "7" * 5000), r"not valid JSON \(Exceeds the limit"),
    "bool as int": (_doc(lambda d: d.update(num_shards=True)), r"num_shards True is not a count"),
    "negative count": (_doc(lambda d: d.update(num_samples=-10)), r"num_samples -10 is not a count"),
    "generation 2^63": (_doc(lambda d: d.update(generation=2**63)), r"generation 9223372036854775808 is not a count"),
    "more shards than the table": (_doc(lambda d: d.update(num_shards=4)),
                                   r"id\.npy holds int64\[3\], the header promises int64\[4\]"),
    "more samples than the table": (_doc(lambda d: d.update(num_samples=11)),
                                    r"the table's shards hold 10 samples, the header says 11"),
    "table up and out": (_doc(lambda d: d.update(table="manifest.d/../../etc")),
                         r"table 'manifest\.d/\.\./\.\./etc' is not a manifest\.d/<snapshot> directory of this cache"),
    "table absolute": (_doc(lambda d: d.update(table="/etc")), r"table '/etc' is not a manifest\.d/<snapshot>"),
    "table not text": (_doc(lambda d: d.update(table=5)), r"table 5 is not a manifest\.d/<snapshot>"),
    "no table": (_doc(lambda d: d.pop("table")), r"malformed entry \(KeyError"),
    "snapshot id": (_doc(lambda d: d.update(snapshot_id="../x")), r"snapshot_id '\.\./x' is not 16 hex digits"),
    "checksummed unknown field": (_doc(lambda d: d.update(checksummed_fields=["nope"])),
                                  r"checksummed_fields \['nope'\] names fields the manifest does not have"),
    "field without columns": (_doc(lambda d: d["fields"].update(extra={"dtype": "<f4", "shape": []})),
                              r"its table lacks extra\.offset\.npy"),
    "no fields": (_doc(lambda d: d.update(fields={})), r"lists no fields"),
    "string shape": (_doc(lambda d: _feats(d).update(shape="3")), r"shape '3', not a list of sizes"),
    "huge dtype": (_doc(lambda d: _feats(d).update(dtype="U99999999999999")), r"which is not allowed"),
    "object dtype": (_doc(lambda d: _feats(d).update(dtype="O")), r"dtype object, which is not allowed"),
    "subarray dtype": (_doc(lambda d: _feats(d).update(dtype="(2,)f2")), r"not allowed"),
    "version text": (_doc(lambda d: d.update(version="3")), r"version '3' is not a version number"),
    "version 99": (_doc(lambda d: d.update(version=99)), r"version 99 is newer than this shardstore reads \(3\)"),
    "left_out reason not text": (_doc(lambda d: d.update(left_out=[{"path": "x", "reason": 5}])), r"is not a string"),
}


def write_header_case(root: Path, name: str) -> None:
    """A format-3 manifest.json with case ``name``'s defect in its header (the table is left as built)."""
    build_manifest(root, checksum=True)
    edit, _ = HEADER_CASES[name]
    path = root / "manifest.json"
    path.write_text(edit(path.read_text()))


@pytest.mark.parametrize("name", sorted(HEADER_CASES))
@pytest.mark.slow
def test_format3_header_defect_is_one_line_naming_file_and_fix(native_cache: Path, name: str,
                                                                capsys: pytest.CaptureFixture) -> None:
    write_header_case(native_cache, name)
    for check in ("open", "all"):
        with pytest.raises(ManifestError, match=HEADER_CASES[name][1]) as info:
            ShardStore.open(native_cache, check=check)
        line = str(info.value)
        assert "\n" not in line and len(line) < 600
        assert line.startswith(f"{native_cache / 'manifest.json'}: ")
        assert line.endswith(f"rebuild it with `shardstore build-manifest {native_cache}`")
    for command in ("info", "verify"):
        code = main([command, str(native_cache)])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and err.startswith("shardstore: error: "), err
        assert "manifest.json: " in err and "Traceback" not in err


@pytest.mark.parametrize("name", _recovers_params(HEADER_CASES))
@pytest.mark.slow
def test_format3_header_defect_is_recovered_by_a_build(native_cache: Path, name: str,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    write_header_case(native_cache, name)
    report = build_manifest(native_cache)
    assert "ignoring the existing manifest" in caplog.text
    assert [(s.id, s.num_samples) for s in report.manifest.shards] == [(0, 4), (1, 4), (2, 2)]
    store = ShardStore.open(native_cache, check="all")
    np.testing.assert_array_equal(store.sample(9)["images"], sample_arrays(10)["images"][9])


# -- format 3: the table's columns -------------------------------------------------------------------------------


def _object_column() -> np.ndarray:
    return np.array([0, 1, 2], dtype=object)


# (column, its new content from the built one, what the one line says)
COLUMN_CASES = {
    "negative rows": ("samples", lambda c: np.array([-5, 4, 2], np.int64),
                      r"a shard has a negative sample count \(-5\)"),
    "rows changed": ("samples", lambda c: np.array([4, 4, 3], np.int64),
                     r"the table's shards hold 11 samples, the header says 10"),
    "shard listed twice": ("id", lambda c: np.array([0, 0, 2], np.int64),
                           r"shard id 0 at row 1 is listed twice or out of id order"),
    "out of id order": ("id", lambda c: np.array([0, 2, 1], np.int64), r"shard id 1 at row 2 is listed twice or out"),
    "negative id": ("id", lambda c: np.array([-3, 1, 2], np.int64), r"shard id -3 at row 0 is listed twice or out"),
    "wrong dtype": ("id", lambda c: c.astype(np.int32), r"id\.npy holds int32\[3\], the header promises int64\[3\]"),
    "short column": ("labels.offset", lambda c: c[:2],
                     r"labels\.offset\.npy holds uint32\[2\], the header promises uint32\[3\]"),
    "2-d column": ("samples", lambda c: c[:, None],
                   r"samples\.npy holds int64\[3, 1\], the header promises int64\[3\]"),
    "pickled column": ("samples", lambda c: pickle.dumps([4, 4, 2]), r"samples\.npy is not a plain \.npy array"),
    "object column": ("samples", lambda c: _object_column(), r"samples\.npy is not a plain \.npy array"),
    "not npy": ("images.mtime_ns", lambda c: b"hello", r"images\.mtime_ns\.npy is not a plain \.npy array"),
    "truncated column": ("id", lambda c: _npy_bytes(c)[:140], r"id\.npy is not a plain \.npy array"),
    "missing column": ("images.mtime_ns", None, r"its table lacks images\.mtime_ns\.npy"),
}


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def write_column_case(root: Path, name: str) -> None:
    build_manifest(root, checksum=True)
    name_, make, _ = COLUMN_CASES[name]
    if make is None:
        os.unlink(table_dir(root) / f"{name_}.npy")
    else:
        replace_column(root, name_, make(column(root, name_)))


@pytest.mark.parametrize("name", sorted(COLUMN_CASES))
@pytest.mark.slow
def test_format3_column_defect_is_one_line_exit_2_and_a_build_recovers(native_cache: Path, name: str,
                                                                       capsys: pytest.CaptureFixture) -> None:
    write_column_case(native_cache, name)
    for check in ("open", "all"):
        with pytest.raises(ManifestError, match=COLUMN_CASES[name][2]) as info:
            ShardStore.open(native_cache, check=check)
        line = str(info.value)
        assert "\n" not in line and line.startswith(f"{native_cache / 'manifest.json'}: ")
        assert line.endswith(f"rebuild it with `shardstore build-manifest {native_cache}`")
    for command in ("info", "verify"):
        code = main([command, str(native_cache)])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and err.startswith("shardstore: error: "), err
    report = build_manifest(native_cache)
    assert [(s.id, s.num_samples) for s in report.manifest.shards] == [(0, 4), (1, 4), (2, 2)]
    assert ShardStore.open(native_cache, check="all").sample(9)["labels"] == 9 % 7
