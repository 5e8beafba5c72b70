"""Symlinks out of the cache root: a shard directory and a shard file linked to a folder outside. build-manifest,
verify, opening the store, train and cache-teacher --overwrite never read, print, follow or delete anything
outside: the outside files keep their bytes and (where the file system records it) their access time, and their
content never shows in any output."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from shardstore import CorruptShardError, ManifestError, ShardStore
from shardstore.store.reader import load_manifest

from .harness import Outcome, assert_one_line_error, cli, file_digests, run_sets, tiny_cache, warm

pytestmark = pytest.mark.slow
OLD_ATIME = 1_000_000_000  # 2001: any read on a relatime file system moves it


class Outside:
    """A folder next to the cache that nothing may touch: a valid-looking shard and a text canary."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.canary = f"CANARY-{secrets.token_hex(8)}"
        shard = folder / "shard_000009"
        shard.mkdir(parents=True)
        np.save(shard / "images.npy", np.full((16, 3, 16, 16), 7, np.uint8))
        np.save(shard / "labels.npy", np.arange(16, dtype=np.int64))
        for name in ("teacher_views", "teacher_topk_index", "teacher_topk_logp", "teacher_tail_logp"):
            np.save(shard / f"{name}.npy", np.zeros((16, 2), np.float16))
        (folder / "canary.npy").write_text(f"{self.canary} this is not an array; printing it leaks it\n")
        np.save(folder / "labels_same_size.npy", np.arange(16, dtype=np.int64) + 100)
        self.files = {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        self.folders = [p for p in sorted(folder.rglob("*")) if p.is_dir()]
        self.atime_recorded = self._atime_works()
        self.mark()

    def _atime_works(self) -> bool:
        probe = self.folder / "probe"
        probe.write_text("x")
        os.utime(probe, (OLD_ATIME, time.time()))
        probe.read_text()
        works = os.stat(probe).st_atime != OLD_ATIME
        probe.unlink()
        return works

    def mark(self) -> None:
        """Set every outside file's and folder's access time far back, so a read shows."""
        for p in [*self.folder.rglob("*"), self.folder]:
            os.utime(p, (OLD_ATIME, os.stat(p).st_mtime))

    def assert_untouched(self, *outcomes: Outcome) -> None:
        if self.atime_recorded:  # first: reading the files here would move their access times
            for p in sorted([self.folder, *self.folders, *self.files]):
                assert os.stat(p).st_atime == OLD_ATIME, f"{p} (outside the root) was read or listed"
        for outcome in outcomes:
            assert self.canary not in outcome.out + outcome.err, f"outside content printed: {outcome.describe()}"
        now = {p: p.read_bytes() for p in sorted(self.folder.rglob("*")) if p.is_file()}
        assert now == self.files, "a file outside the cache root was changed or deleted"


@pytest.fixture
def outside(tmp_path: Path) -> Outside:
    return Outside(tmp_path / "outside")


def link_out(root: Path, outside: Outside) -> None:
    """shard_000009 is a link to the outside shard; shard_000003/labels.npy a link to the outside canary."""
    (root / "shard_000009").symlink_to(outside.folder / "shard_000009", target_is_directory=True)
    labels = root / "shard_000003" / "labels.npy"
    labels.unlink()
    labels.symlink_to(outside.folder / "canary.npy")


def test_build_manifest_leaves_linked_shards_out_without_reading_them(tmp_path: Path, outside: Outside) -> None:
    root = tiny_cache(tmp_path / "cache")
    (root / "manifest.json").unlink()
    link_out(root, outside)
    warm()
    runs = [cli("build-manifest", root), cli("build-manifest", "--checksum", "--full", root)]
    for outcome in runs:
        assert outcome.code == 0, outcome.describe()
        left_out = [line for line in outcome.err_lines if line.startswith("left out:")]
        assert any("shard_000009" in line for line in left_out), outcome.describe()
        assert any("shard_000003" in line for line in left_out), outcome.describe()
        for line in left_out:
            assert "rebuild" not in line, f"advice that loops: {line}"
    manifest = load_manifest(root, check="all")
    assert [s.id for s in manifest.shards] == [0, 1, 2, 4, 5]
    outside.assert_untouched(*runs)
    for line in runs[0].err_lines:
        print(f"\nattack symlinks, build-manifest: {line[:200]}")


def test_verify_open_and_train_refuse_a_manifest_entry_linked_outside(tmp_path: Path, outside: Outside) -> None:
    root = tiny_cache(tmp_path / "cache")
    warm()
    assert cli("build-manifest", "--checksum", root).code == 0
    # Swap a listed file for a link to an outside file of the same size after the manifest was built.
    labels = root / "shard_000003" / "labels.npy"
    assert labels.stat().st_size == (outside.folder / "labels_same_size.npy").stat().st_size
    labels.unlink()
    labels.symlink_to(outside.folder / "labels_same_size.npy")
    outside.mark()

    verify = cli("verify", root)
    assert verify.code in (1, 2), verify.describe()
    assert "shard_000003/labels.npy" in verify.out + verify.err, verify.describe()
    assert "0 bad" not in verify.out, f"verify passed a file outside the root: {verify.describe()}"
    with pytest.raises(ManifestError, match=r"shard_000003/labels\.npy.*outside"):
        ShardStore.open(root, check="all")
    store = ShardStore.open(root)  # files are checked when first mapped
    position = store.shard_ids.tolist().index(3)
    with pytest.raises(CorruptShardError, match=r"shard_000003/labels\.npy resolves to .*, outside the cache root"):
        store.field(position, "labels")
    train = cli("train", *run_sets(tmp_path / "run", root), "--device", "cpu")
    line = assert_one_line_error(train, "shard_000003/labels.npy")
    outside.assert_untouched(verify, train)
    print(f"\nattack symlinked manifest entry: verify exit {verify.code}: {verify.err_lines[-1][:160]}; "
          f"train: {line[:160]}")


def test_cache_teacher_overwrite_deletes_only_its_own_files(tmp_path: Path, outside: Outside) -> None:
    root = tiny_cache(tmp_path / "cache")
    sets = run_sets(tmp_path / "run", root)
    fill = ("--views", "2", "--topk", "3", "--device", "cpu")
    warm()
    first = cli("cache-teacher", *sets, *fill)
    assert first.code == 0, first.describe()
    base = file_digests(root, "shard_*/[il]*.npy")
    # Files named like the group's, where the group never wrote: behind a link, in an unrelated folder.
    (root / "shard_000009").symlink_to(outside.folder / "shard_000009", target_is_directory=True)
    notes = root / "notes"
    notes.mkdir()
    np.save(notes / "teacher_views.npy", np.ones(3))
    (root / "old_shard_000002").mkdir()
    np.save(root / "old_shard_000002" / "teacher_views.npy", np.ones(3))
    outside.mark()

    again = cli("cache-teacher", *sets, *fill, "--overwrite")
    assert again.code in (0, 2), again.describe()
    assert (notes / "teacher_views.npy").exists(), "--overwrite deleted a file in an unrelated folder"
    assert (root / "old_shard_000002" / "teacher_views.npy").exists(), "--overwrite deleted a file it did not write"
    assert file_digests(root, "shard_*/[il]*.npy") == base, "--overwrite touched the cache's own fields"

    # A declaration edited to claim a base field: --overwrite must not delete every labels.npy.
    declaration = root / "teacher.fields.json"
    doc = json.loads(declaration.read_text())
    doc["fields"]["labels"] = {"dtype": "<i8", "shape": []}
    declaration.write_text(json.dumps(doc))
    hostile = cli("cache-teacher", *sets, *fill, "--overwrite")
    assert hostile.code == 2, hostile.describe()
    assert file_digests(root, "shard_*/[il]*.npy") == base, "an edited declaration made --overwrite delete a base field"
    outside.assert_untouched(first, again, hostile)
    print(f"\nattack symlinks, --overwrite: exit {again.code}; edited declaration: {hostile.err_lines[-1][:200]}")
    shutil.rmtree(notes)
