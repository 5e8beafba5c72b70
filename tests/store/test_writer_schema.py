"""ShardWriter refuses samples whose fields differ from the shards already in the cache, before writing anything."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest

from shardstore import ShardWriter, WriterError, build_manifest
from shardstore.cli import main
from shardstore.store.groups import GroupSpec, write_group_spec


def batch(n: int, side: int = 8, dtype: type = np.uint8, **extra: np.ndarray) -> dict[str, np.ndarray]:
    images = (np.arange(n * 3 * side * side) % 251).astype(dtype).reshape(n, 3, side, side)
    return {"images": images, "labels": np.arange(n, dtype=np.int64), **extra}


def first_cache(root: Path) -> Path:
    with ShardWriter(root, 4, num_shards=2, fsync=False) as w:
        w.add_batch(batch(8))
    return root


def entries(root: Path) -> list[str]:
    return sorted(os.listdir(root))


@pytest.mark.parametrize(("new", "old_shown", "new_shown"), [
    (batch(4, side=4), "images uint8 [3, 8, 8]", "images uint8 [3, 4, 4]"),
    (batch(4, dtype=np.float16), "images uint8 [3, 8, 8]", "images float16 [3, 8, 8]"),
    ({"images": batch(4)["images"]}, "labels int64 []", "no labels"),  # a field the cache has
    (batch(4, ids=np.arange(4)), "no ids", "ids int64 []"),  # a field the cache does not have
])
def test_other_fields_are_refused_before_anything_is_written(tmp_path: Path, new: dict, old_shown: str,
                                                             new_shown: str) -> None:
    root = first_cache(tmp_path / "c")
    before = entries(root)
    w = ShardWriter(root, 4, start_shard=2, fsync=False)
    with pytest.raises(WriterError, match=re.escape(
            f"{root} holds shards (shard_000000, ...) with {old_shown}, this write gives {new_shown}; a cache has one "
            "dtype and per-sample shape per field (other shards would be left out of its manifest): write to a new "
            "cache directory") + "$"):
        w.add_batch(new)
    w.abort()
    assert entries(root) == before  # no shard, no temporary


def test_the_same_fields_continue_the_cache(tmp_path: Path) -> None:
    root = first_cache(tmp_path / "c")
    with ShardWriter(root, 4, start_shard=2, fsync=False) as w:
        w.add_batch(batch(6))
    assert build_manifest(root).manifest.num_samples == 14


def test_fields_of_groups_are_not_compared(tmp_path: Path) -> None:
    root = first_cache(tmp_path / "c")
    write_group_spec(root, GroupSpec("teacher", {"teacher_logits": (np.dtype(np.float16), (10,))}))
    for shard in ("shard_000000", "shard_000001"):
        np.save(root / shard / "teacher_logits.npy", np.zeros((4, 10), np.float16))
    with ShardWriter(root, 4, start_shard=2, fsync=False) as w:
        w.add_batch(batch(4))
    assert (root / "shard_000002" / "images.npy").exists()


def test_a_producer_can_check_before_decoding(tmp_path: Path) -> None:
    root = first_cache(tmp_path / "c")
    w = ShardWriter(root, 4, start_shard=2, fsync=False)
    w.check_fields({"images": (np.dtype(np.uint8), (3, 8, 8)), "labels": (np.dtype(np.int64), ())})
    with pytest.raises(WriterError, match=r"this write gives images uint8 \[3, 16, 16\]"):
        w.check_fields({"images": (np.dtype(np.uint8), (3, 16, 16)), "labels": (np.dtype(np.int64), ())})
    w.abort()


def test_an_empty_root_takes_any_fields(tmp_path: Path) -> None:
    with ShardWriter(tmp_path / "c", 4, fsync=False) as w:
        w.add_batch(batch(4, side=5, dtype=np.float32))
    assert (tmp_path / "c" / "shard_000000" / "images.npy").exists()


def image_folder(folder: Path, n: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        (folder / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(folder / f"class{i % 2}" / f"{i}.png")
    return folder


def test_write_with_another_image_size_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder, root = image_folder(tmp_path / "imgs", 12), tmp_path / "cache"
    common = ["write", str(root), "--from-folder", str(folder), "--shard-size", "4"]
    assert main([*common, "--image-size", "8", "--num-shards", "2"]) == 0
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    capsys.readouterr()
    assert main([*common, "--image-size", "6", "--start-shard", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"shardstore: error: {root} holds shards (shard_000000, ...) with "
                                               "images uint8 [3, 8, 8], this write gives images uint8 [3, 6, 6]; ")
    assert err[0].endswith("write to a new cache directory")
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before  # nothing written, nothing touched
