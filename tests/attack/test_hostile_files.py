"""Hostile manifests and shard files. A manifest edited to hold 1e400, 10^5 nested brackets, a 5,000-digit
integer, a NUL byte in a path, negative offsets, a shard id of 2^64 or a ``..`` path makes every reading command
exit 2 with one line, and ``build-manifest`` recovers; values tampered within range are never used to read the
wrong bytes. Hostile ``.npy`` files (text, empty, pickled objects, cut headers, Fortran order, other byte orders
and dtypes) are left out of the manifest with one precise line each, never loaded, never advised around."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from shardstore import ShardstoreError, ShardStore
from shardstore.manifest.model import Manifest
from tests.conftest import sample_arrays, write_native

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


def hostile_copy(pristine: Path, tmp_path: Path, edit: Callable[[str], str]) -> Path:
    root = tmp_path / "cache"
    shutil.copytree(pristine, root)
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copyfile(root / "shard_000000" / "images.npy", outside / "images.npy")
    manifest = root / "manifest.json"
    manifest.write_text(edit(manifest.read_text()))
    return root


@pytest.mark.parametrize("kind", list(MALFORMED))
def test_a_malformed_manifest_is_one_line_everywhere_and_a_rebuild_recovers(pristine: Path, tmp_path: Path,
                                                                            kind: str) -> None:
    root = hostile_copy(pristine, tmp_path, MALFORMED[kind])
    lines = []
    for argv in (["info", root], ["verify", root],
                 ["train", *run_sets(tmp_path / "run", root, train__epochs=1), "--device", "cpu"]):
        outcome = cli(*argv, timeout=60)
        lines.append(assert_one_line_error(outcome, "manifest.json"))
    rebuilt = cli("build-manifest", root, timeout=60)
    assert rebuilt.code == 0, rebuilt.describe()
    assert "Traceback" not in rebuilt.err
    want = Manifest.from_json((pristine / "manifest.json").read_text())
    assert shape_of(Manifest.from_json((root / "manifest.json").read_text())) == shape_of(want)
    for name, values in read_everything(root).items():
        np.testing.assert_array_equal(values, read_everything(pristine)[name])
    print(f"\nattack manifest {kind}: {lines[0][:200]}")


@pytest.mark.parametrize("kind", list(TAMPERED))
def test_a_tampered_manifest_never_reads_the_wrong_bytes_and_a_rebuild_rederives_it(pristine: Path, tmp_path: Path,
                                                                                    kind: str) -> None:
    root = hostile_copy(pristine, tmp_path, TAMPERED[kind])
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
    assert shape_of(Manifest.from_json((root / "manifest.json").read_text())) == shape_of(
        Manifest.from_json((pristine / "manifest.json").read_text())), f"{kind} survived a rebuild"
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
