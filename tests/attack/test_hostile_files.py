"""Hostile manifests and shard files. A manifest edited to hold 1e400, 10^5 nested brackets, a 5,000-digit
integer, a NUL byte in a path, negative offsets, a shard id of 2^64 or a ``..`` path makes every reading command
exit 2 with one line, and ``build-manifest`` recovers; values tampered within range are never used to read the
wrong bytes. Format 2 (all JSON, still read) is attacked through its shard entries, format 3 through its header
and its table's columns. Hostile ``.npy`` files (text, empty, pickled objects, cut headers, Fortran order, other
byte orders and dtypes) are left out of the manifest with one precise line each, never loaded, never advised around."""

from __future__ import annotations

import json
import pickle
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from shardstore import ShardStore, ShardstoreError
from shardstore.store.manifest import Manifest
from shardstore.store.reader import load_manifest
from tests.conftest import sample_arrays, write_native
from tests.manifest.synthetic import column, replace_column

from .harness import assert_one_line_error, cli, run_sets, tiny_cache, warm

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    warm()
    root = tiny_cache(tmp_path_factory.mktemp("pristine") / "cache")
    assert cli("build-manifest", "--checksum", "--full", root).code == 0
    return root


def shape_of(manifest: Manifest) -> list[tuple]:
    """What a manifest says about the shards, checksums aside: ids, rows, files, sizes and data offsets."""
    return [(s.id, s.num_samples, s.layout, sorted((n, f.path, f.bytes, f.data_offset) for n, f in s.files.items()))
            for s in manifest.shards]


def read_everything(root: Path) -> dict[str, np.ndarray]:
    store = ShardStore.open(root)
    return {name: np.concatenate([np.array(store.field(p, name)) for p in range(store.num_shards)])
            for name in store.fields}


def as_doc(edit: Callable[[dict], None]) -> Callable[[str], str]:
    def apply(text: str) -> str:
        doc = json.loads(text)
        edit(doc)
        return json.dumps(doc, indent=1)
    return apply


def first_file(doc: dict) -> dict:
    return doc["shards"][0]["files"]["images"]


MALFORMED: dict[str, Callable[[str], str]] = {
    "1e400": lambda t: re.sub(r'"bytes": \d+', '"bytes": 1e400', t, count=1),
    "nested-1e5": lambda t: t.replace('"left_out": []', '"left_out": ' + "[" * 100_000 + "]" * 100_000),
    "5000-digits": lambda t: re.sub(r'"mtime_ns": \d+', '"mtime_ns": 1' + "0" * 4999, t, count=1),
    "nul-in-path": as_doc(lambda d: first_file(d).update(path="shard_000000/images\x00.npy")),
    "negative-offset": as_doc(lambda d: first_file(d).update(data_offset=-5)),
    "negative-bytes": as_doc(lambda d: first_file(d).update(bytes=-1)),
    "id-2**64": as_doc(lambda d: d["shards"][0].update(id=2**64)),
    "dotdot-path": as_doc(lambda d: first_file(d).update(path="../outside/images.npy")),
}

# Parseable, in range, and wrong: the store must not read other bytes than the files hold.
TAMPERED: dict[str, Callable[[str], str]] = {
    "offset-0": as_doc(lambda d: first_file(d).update(data_offset=0)),
    "rows-negative": as_doc(lambda d: d["shards"][0].update(num_samples=-5)),
    "rows-fewer": as_doc(lambda d: d["shards"][0].update(num_samples=3)),
    "duplicate-shard": as_doc(lambda d: d["shards"].insert(1, d["shards"][0])),
}


def _edit_column(name: str, change: Callable[[np.ndarray], np.ndarray | bytes]) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        replace_column(root, name, change(column(root, name)))
    return apply


def _header(edit: Callable[[str], str]) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        path = root / "manifest.json"
        path.write_text(edit(path.read_text()))
    return apply


def _rows(position: int, rows: int) -> Callable[[Path], None]:
    """Shard ``position`` claims ``rows`` rows, and the header's total agrees (so only the files can tell)."""
    def apply(root: Path) -> None:
        samples = column(root, "samples")
        change = rows - int(samples[position])
        samples[position] = rows
        replace_column(root, "samples", samples)
        _header(lambda t: re.sub(r'"num_samples": (\d+)', lambda m: f'"num_samples": {int(m.group(1)) + change}', t,
                                 count=1))(root)
    return apply


def _shift(ids: np.ndarray) -> np.ndarray:
    ids = ids.copy()
    ids[1] = ids[0]
    return ids


# Format 3: the header or a column of the table, broken.
MALFORMED_TABLE: dict[str, Callable[[Path], None]] = {
    "header-1e400": _header(lambda t: re.sub(r'"num_samples": \d+', '"num_samples": 1e400', t, count=1)),
    "header-nested-1e5": _header(lambda t: t.replace('"left_out": []', '"left_out": ' + "[" * 100_000 + "]" * 100_000)),
    "header-5000-digits": _header(lambda t: re.sub(r'"num_shards": \d+', '"num_shards": 1' + "0" * 4999, t, count=1)),
    "header-table-dotdot": _header(as_doc(lambda d: d.update(table="manifest.d/../../outside"))),
    "column-pickled": _edit_column("id", lambda c: pickle.dumps(c.tolist())),
    "column-int32": _edit_column("samples", lambda c: c.astype(np.int32)),
    "column-short": _edit_column("images.offset", lambda c: c[:-1]),
}

# Format 3: parseable, in range, and wrong.
TAMPERED_TABLE: dict[str, Callable[[Path], None]] = {
    "rows-fewer": _rows(0, 3),
    "rows-more": _rows(0, 40),
    "duplicate-shard": _edit_column("id", _shift),
    "offset-header": _edit_column("images.offset", lambda c: np.where(np.arange(c.size) == 0, 64, c).astype(c.dtype)),
}


def hostile_copy(pristine: Path, tmp_path: Path, edit: Callable[[str], str] | None = None,
                 table_edit: Callable[[Path], None] | None = None) -> Path:
    """A copy of the pristine cache: its manifest as format 2 edited by ``edit``, or format 3 by ``table_edit``."""
    root = tmp_path / "cache"
    shutil.copytree(pristine, root)
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copyfile(root / "shard_000000" / "images.npy", outside / "images.npy")
    if edit is not None:
        manifest = root / "manifest.json"
        manifest.write_text(edit(load_manifest(root).to_json()))
    if table_edit is not None:
        table_edit(root)
    return root


def _cases(json_cases: dict, table_cases: dict) -> list:
    def marks(kind: str, table: bool) -> list:
        return []

    return ([pytest.param(kind, json_cases[kind], None, id=f"v2-{kind}", marks=marks(kind, False))
             for kind in json_cases]
            + [pytest.param(kind, None, table_cases[kind], id=f"v3-{kind}", marks=marks(kind, True))
               for kind in table_cases])


@pytest.mark.parametrize(("kind", "edit", "table_edit"), _cases(MALFORMED, MALFORMED_TABLE))
def test_a_malformed_manifest_is_one_line_everywhere_and_a_rebuild_recovers(pristine: Path, tmp_path: Path,
                                                                            kind: str, edit, table_edit) -> None:
    root = hostile_copy(pristine, tmp_path, edit, table_edit)
    lines = []
    for argv in (["info", root], ["verify", root],
                 ["train", *run_sets(tmp_path / "run", root, train__epochs=1), "--device", "cpu"]):
        outcome = cli(*argv, timeout=60)
        lines.append(assert_one_line_error(outcome, "manifest.json"))
    rebuilt = cli("build-manifest", root, timeout=60)
    assert rebuilt.code == 0, rebuilt.describe()
    assert "Traceback" not in rebuilt.err
    assert shape_of(load_manifest(root, check="all")) == shape_of(load_manifest(pristine))
    for name, values in read_everything(root).items():
        np.testing.assert_array_equal(values, read_everything(pristine)[name])
    print(f"\nattack manifest {kind}: {lines[0][:200]}")


@pytest.mark.parametrize(("kind", "edit", "table_edit"), _cases(TAMPERED, TAMPERED_TABLE))
def test_a_tampered_manifest_never_reads_the_wrong_bytes_and_a_rebuild_rederives_it(pristine: Path, tmp_path: Path,
                                                                                    kind: str, edit,
                                                                                    table_edit) -> None:
    root = hostile_copy(pristine, tmp_path, edit, table_edit)
    want = read_everything(pristine)
    try:
        got = read_everything(root)
    except ShardstoreError as exc:  # refusing is right; so is reading exactly what the files hold
        assert "\n" not in str(exc)
    else:
        assert got.keys() == want.keys()
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=f"{kind}: {name} read wrongly")
    rebuilt = cli("build-manifest", root, timeout=60)  # incremental, as write and cache-teacher run it
    assert rebuilt.code == 0, rebuilt.describe()
    assert shape_of(load_manifest(root, check="all")) == shape_of(load_manifest(pristine)), f"{kind} survived a rebuild"
    verify_out = cli("verify", root, timeout=60)
    assert verify_out.code == 0, verify_out.describe()


def test_a_shard_id_of_2_64_on_disk_is_left_out_and_the_rest_opens(tmp_path: Path) -> None:
    root = write_native(tmp_path / "cache", 12, 4)
    huge = root / f"shard_{2**64}"
    shutil.copytree(root / "shard_000001", huge)
    warm()
    built = cli("build-manifest", root)
    assert built.code == 0, built.describe()
    assert any(str(2**64)[:20] in line for line in built.err_lines if line.startswith("left out:")), built.describe()
    info = cli("info", root)
    assert info.code == 0, info.describe()
    assert [s.id for s in ShardStore.open(root).shards] == [0, 1, 2]


class Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def npy_bytes(arr: np.ndarray, **kwargs) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, arr, **kwargs)
    return buf.getvalue()


def test_hostile_npy_files_are_left_out_with_one_precise_line(tmp_path: Path) -> None:
    root = write_native(tmp_path / "cache", 12, 4)  # shards 0..2: images uint8 (2,3,4), labels int64, feats float16
    marker = tmp_path / "payload_ran"
    good = sample_arrays(4, start=100)
    objects = np.empty(4, dtype=object)
    objects[:] = [Evil(marker)] * 4
    valid = npy_bytes(good["labels"])
    hostile = {
        "text": ("labels", b"id,label\n0,3\n1,4\n"),
        "empty": ("labels", b""),
        "object-dtype": ("labels", npy_bytes(objects, allow_pickle=True)),
        "header-cut": ("labels", valid[:20]),
        "data-cut": ("labels", valid[:-8]),
        "fortran": ("images", npy_bytes(np.asfortranarray(good["images"]))),
        "big-endian": ("feats", npy_bytes(good["feats"].astype(">f2"))),
        "other-dtype": ("images", npy_bytes(good["images"].astype(np.float32))),
        "structured": ("labels", npy_bytes(np.zeros(4, dtype=[("a", "<i8")]))),
        "zero-d": ("labels", npy_bytes(np.array(5))),
        "other-shape": ("images", npy_bytes(np.zeros((4, 3, 2, 4), np.uint8))),
    }
    for k, (field, data) in enumerate(hostile.values()):
        shard = root / f"shard_{10 + k:06d}"
        shard.mkdir()
        for name, arr in good.items():
            (shard / f"{name}.npy").write_bytes(data if name == field else npy_bytes(arr))
    warm()
    built = cli("build-manifest", root)
    assert built.code == 0, built.describe()
    assert "Traceback" not in built.err
    left_out = [line for line in built.err_lines if line.startswith("left out:")]
    for k, (kind, (field, _)) in enumerate(hostile.items()):
        lines = [line for line in left_out if f"shard_{10 + k:06d}" in line]
        assert len(lines) == 1 and f"{field}.npy" in lines[0], f"{kind}: {built.describe()}"
        assert "allow_pickle" not in lines[0], f"{kind}: never advise allow_pickle: {lines[0]}"
        if kind == "empty":
            assert "interrupted" not in lines[0] and "empty" in lines[0], lines[0]
        print(f"\nattack npy {kind}: {lines[0][:220]}")
    assert not marker.exists(), "a pickled object in a .npy ran"
    assert [s.id for s in ShardStore.open(root).shards] == [0, 1, 2]
