"""ImageFormat: the layout read from the manifest, each dtype turned into network values without touching the
loader's buffers, and label ranges recorded by build-manifest and checked against num_classes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import shardstore.manifest.scan as scan
from shardstore import build_manifest
from shardstore.config.data import DataConfig
from shardstore.errors import ConfigError, ManifestError
from shardstore.kd.augment import apply_views, center_views
from shardstore.kd.images import ImageFormat, check_labels, image_format
from shardstore.store.reader import ShardStore
from tests.manifest.synthetic import column, replace_column


def flat(root: Path, images: np.ndarray, labels: np.ndarray, shard_size: int = 4) -> ShardStore:
    root.mkdir(parents=True, exist_ok=True)
    for shard_id, lo in enumerate(range(0, len(images), shard_size)):
        np.save(root / f"images_{shard_id:06d}.npy", images[lo: lo + shard_size])
        np.save(root / f"labels_{shard_id:06d}.npy", labels[lo: lo + shard_size])
    build_manifest(root)
    return ShardStore.open(root)


@pytest.mark.parametrize("shape, layout, chw", [
    ((3, 32, 32), "CHW", (3, 32, 32)), ((32, 32, 3), "HWC", (3, 32, 32)), ((1, 28, 28), "CHW", (1, 28, 28)),
    ((28, 28, 1), "HWC", (1, 28, 28)), ((28, 28), "HW", (1, 28, 28)), ((4, 8, 8), "CHW", (4, 8, 8)),
    ((8, 6, 4), "HWC", (4, 8, 6)),
])
def test_the_layout_is_read_from_the_per_sample_shape(tmp_path: Path, shape: tuple, layout: str, chw: tuple) -> None:
    store = flat(tmp_path, np.zeros((4, *shape), np.uint8), np.zeros(4, np.int64))
    fmt, _ = image_format(DataConfig(cache_root=str(tmp_path)), store)
    assert (fmt.layout, fmt.shape, fmt.dtype, fmt.scale) == (layout, chw, "uint8", 255.0)


@pytest.mark.parametrize("shape", [(3, 3, 3), (5, 32, 32), (3, 16, 3), (1, 8, 1)])
def test_an_ambiguous_shape_asks_for_the_layout_key(tmp_path: Path, shape: tuple) -> None:
    store = flat(tmp_path, np.zeros((4, *shape), np.uint8), np.zeros(4, np.int64))
    with pytest.raises(ConfigError, match=r"cannot tell which axis .* set data.image_layout: CHW"):
        image_format(DataConfig(cache_root=str(tmp_path)), store)
    fmt, _ = image_format(DataConfig(cache_root=str(tmp_path), image_layout="HWC"), store)
    assert fmt.shape == (shape[2], shape[0], shape[1])


def test_images_become_chw_network_values_without_writing_into_the_batch() -> None:
    rng = np.random.default_rng(0)
    chw = rng.integers(0, 256, (2, 3, 5, 7)).astype(np.uint8)
    as_uint8 = torch.from_numpy(chw)
    same = ImageFormat(shape=(3, 5, 7)).images(as_uint8)
    assert same is as_uint8  # uint8 at 255 is left to apply_views: the bits of every uint8 run before
    hwc = torch.from_numpy(np.ascontiguousarray(chw.transpose(0, 2, 3, 1)))
    assert torch.equal(ImageFormat(layout="HWC").images(hwc), as_uint8)  # a permuted view, no copy
    views = center_views(2, 5, 7)
    assert torch.equal(apply_views(ImageFormat(layout="HWC").images(hwc), views, 4), apply_views(as_uint8, views, 4))

    floats = torch.from_numpy(chw.astype(np.float32))
    before = floats.clone()
    scaled = ImageFormat(dtype="float32", scale=255.0).images(floats)
    assert torch.equal(floats, before) and torch.allclose(scaled, before / 255)  # the loader's buffer is untouched
    half = floats.half() / 255
    assert ImageFormat(dtype="float16", scale=1.0).images(half) is half  # already in range: apply_views reads it
    assert ImageFormat(dtype="float64", scale=1.0).images(half.double()).dtype == torch.float32
    wide = torch.from_numpy(chw.astype(np.uint16) * 257)
    assert torch.allclose(ImageFormat(dtype="uint16", scale=65535.0).images(wide), before / 255)

    bf16 = (floats / 255).to(torch.bfloat16)
    bits = bf16.view(torch.int16)
    assert torch.equal(ImageFormat(dtype="bfloat16", scale=1.0).images(bits), bf16)
    gray = torch.from_numpy(chw[:, 0])  # [B, H, W]
    x = ImageFormat(layout="HW", repeat_gray=True).images(gray)
    assert x.shape == (2, 3, 5, 7) and all(torch.equal(x[:, c], gray) for c in range(3))
    assert torch.equal(ImageFormat().labels(torch.tensor([[3], [4]], dtype=torch.int32)), torch.tensor([3, 4]))


def test_build_manifest_records_each_label_files_range(tmp_path: Path) -> None:
    labels = np.array([0, 1, 2, 3, 7, 5, 6, 4, 9, 9, 8, 8])
    store = flat(tmp_path, np.zeros((12, 3, 4, 4), np.uint8), labels)
    assert [s.files["labels"].value_range for s in store.shards] == [(0, 3), (4, 7), (8, 9)]
    assert all(s.files["images"].value_range is None for s in store.shards)  # images: not labels, never read
    assert column(tmp_path, "labels.min").tolist() == [0, 4, 8] and column(tmp_path, "labels.max").tolist() == [3, 7, 9]
    assert "images.min" not in store.manifest.columns
    doc = json.loads(store.manifest.to_json())  # the same range in a format-2 document
    assert doc["shards"][1]["files"]["labels"] | {"mtime_ns": 0} == {
        "path": "labels_000001.npy", "bytes": 160, "mtime_ns": 0, "data_offset": 128, "checksum": None,
        "min": 4, "max": 7}
    check_labels(store, ImageFormat(), 10)
    with pytest.raises(ConfigError, match=r"go up to 9 \(shard 2\), but model.num_classes is 9; set "
                                          r"model.num_classes to at least 10"):
        check_labels(store, ImageFormat(), 9)

    # rewritten with the same size: the next build reads the values again (never carried over)
    np.save(tmp_path / "labels_000001.npy", np.array([4, 5, 6, 70]))
    assert ShardStore.open(tmp_path).shards[1].files["labels"].value_range == (4, 7)  # stale until rebuilt
    build_manifest(tmp_path)
    assert ShardStore.open(tmp_path).shards[1].files["labels"].value_range == (4, 70)


def test_a_manifest_without_ranges_still_has_its_labels_checked(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    labels = np.array([0, 1, 2, 3, 4, 5, 6, 12])
    monkeypatch.setattr(scan, "LABEL_RANGE_BYTES", 16)  # files larger than this get no range
    store = flat(tmp_path, np.zeros((8, 3, 4, 4), np.uint8), labels)
    assert [s.files["labels"].value_range for s in store.shards] == [None, None]
    with pytest.raises(ConfigError, match=r"go up to 12 \(shard 1\)"):
        check_labels(store, ImageFormat(), 10)  # the label files are read instead
    # a format-3 table whose ranges say "not recorded" (min above max)
    monkeypatch.undo()
    build_manifest(tmp_path)
    replace_column(tmp_path, "labels.min", np.array([1, 1], np.int64))
    replace_column(tmp_path, "labels.max", np.array([0, 0], np.int64))
    assert [s.files["labels"].value_range for s in ShardStore.open(tmp_path).shards] == [None, None]
    with pytest.raises(ConfigError, match=r"go up to 12 \(shard 1\)"):
        check_labels(ShardStore.open(tmp_path), ImageFormat(), 10)
    # a format-2 manifest written before ranges were recorded: no min/max keys at all
    doc = json.loads(build_manifest(tmp_path).manifest.to_json())
    for shard in doc["shards"]:
        shard["files"]["labels"].pop("min", None), shard["files"]["labels"].pop("max", None)
    (tmp_path / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match=r"go up to 12 \(shard 1\)"):
        check_labels(ShardStore.open(tmp_path), ImageFormat(), 10)


def test_minus_one_marks_an_unlabeled_sample_and_is_accepted(tmp_path: Path) -> None:
    store = flat(tmp_path, np.zeros((8, 3, 4, 4), np.uint8), np.array([-1, 0, -1, 9, 1, 2, -1, 3]))
    check_labels(store, ImageFormat(), 10)
    np.save(tmp_path / "labels_000001.npy", np.array([1, -2, 3, 4]))
    build_manifest(tmp_path)
    with pytest.raises(ConfigError, match=r"include -2 \(shard 1\); .* \(or -1: unlabeled\)"):
        check_labels(ShardStore.open(tmp_path), ImageFormat(), 10)


@pytest.mark.parametrize("edit, message", [
    ({"min": 5, "max": 2}, r"labels_000000.npy: min 5 is above max 2"),
    ({"min": 1.5, "max": 2}, r"labels_000000.npy: min 1.5 is not an integer"),
    ({"max": 3}, r"labels_000000.npy: min None is not an integer"),
])
def test_a_tampered_range_is_one_line(tmp_path: Path, edit: dict, message: str) -> None:
    store = flat(tmp_path, np.zeros((4, 3, 4, 4), np.uint8), np.arange(4))
    doc = json.loads(store.manifest.to_json())  # format 2: the range as JSON values
    entry = doc["shards"][0]["files"]["labels"]
    entry.pop("min"), entry.pop("max")
    entry.update(edit)
    (tmp_path / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match=message):
        ShardStore.open(tmp_path)
    build_manifest(tmp_path)  # and a rebuild derives it again
    assert ShardStore.open(tmp_path).shards[0].files["labels"].value_range == (0, 3)
