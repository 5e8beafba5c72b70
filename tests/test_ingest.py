"""Filling a cache from an image folder and from whole-dataset arrays: decoding, bad images, parallel jobs, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shardstore import ShardStore, ShardstoreError, build_manifest
from shardstore.store.ingest import load_image, write_arrays, write_image_folder
from tests.conftest import sample_arrays


def make_folder(root: Path, per_class: int = 5, classes=("cat", "dog")) -> Path:
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            h, w = 20 + 3 * i, 30 - 2 * i  # different sizes and aspect ratios
            img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
            img[..., 0] = 60 * c  # the red channel encodes the class
            Image.fromarray(img).save(root / name / f"{i:03d}.{'png' if i % 2 else 'jpg'}", quality=95)
    return root


def read(root: Path) -> dict[str, np.ndarray]:
    build_manifest(root)
    store = ShardStore.open(root)
    return {f: np.concatenate([store.field(p, f) for p in range(store.num_shards)]) for f in store.fields}


def test_load_image_resizes_and_center_crops_to_chw(tmp_path: Path) -> None:
    img = np.zeros((10, 40, 3), np.uint8)
    img[:, 18:22] = 255  # a white band in the middle survives the center crop
    Image.fromarray(img).save(tmp_path / "x.png")
    out = load_image(tmp_path / "x.png", 8)
    assert out.shape == (3, 8, 8) and out.dtype == np.uint8
    assert out[:, :, 3:5].min() > 200 and out[:, :, 0].max() < 50
    Image.fromarray(img[..., 0]).save(tmp_path / "g.png")  # grayscale becomes RGB
    assert load_image(tmp_path / "g.png", 8).shape == (3, 8, 8)


def test_image_folder_round_trip(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "imgs")
    report = write_image_folder(tmp_path / "c", folder, image_size=16, shard_size=4, shuffle_seed=None, fsync=False)
    assert report.samples_written == 10 and report.shards_written == [0, 1, 2]
    got = read(tmp_path / "c")
    assert got["images"].shape == (10, 3, 16, 16)
    assert got["labels"].tolist() == [0] * 5 + [1] * 5 and got["ids"].tolist() == list(range(10))
    assert json.loads((tmp_path / "c" / "classes.json").read_text()) == ["cat", "dog"]
    assert abs(int(got["images"][7, 0].mean()) - 60) <= 2  # class colour kept (a JPEG may shift it a little)


def test_bad_image_skip_and_stop(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "imgs")
    (folder / "dog" / "002.jpg").write_bytes(b"not an image")
    report = write_image_folder(tmp_path / "c", folder, image_size=8, shard_size=4, shuffle_seed=None, fsync=False)
    assert [p for p, _ in report.bad_inputs] == [str(folder / "dog" / "002.jpg")]
    got = read(tmp_path / "c")
    assert 7 not in got["ids"].tolist() and got["ids"].shape == (9,)
    with pytest.raises(ShardstoreError, match=r"dog/002.jpg: cannot decode image .*pass --on-error skip"):
        write_image_folder(tmp_path / "d", folder, image_size=8, shard_size=4, on_error="stop", shuffle_seed=None,
                           fsync=False)
    assert not any(p.name.startswith("shard_000001") for p in (tmp_path / "d").iterdir())


def test_parallel_jobs_by_shard_range_equal_one_job(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "imgs", per_class=7)
    write_image_folder(tmp_path / "one", folder, image_size=8, shard_size=3, fsync=False)
    for start, num in ((0, 2), (2, 2), (4, 1)):
        write_image_folder(tmp_path / "par", folder, image_size=8, shard_size=3, start_shard=start, num_shards=num,
                           fsync=False)
    a, b = read(tmp_path / "one"), read(tmp_path / "par")
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


def test_folder_job_resumes_from_ids_without_rewriting(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "imgs")
    (folder / "cat" / "001.png").write_bytes(b"broken")  # shifts later samples by one
    root = tmp_path / "c"
    seen = []

    def crash_after_seven(n: int) -> None:
        seen.append(n)
        if len(seen) == 7:
            raise KeyboardInterrupt  # the job dies with shard 0 complete and 2 samples buffered

    with pytest.raises(KeyboardInterrupt):
        write_image_folder(root, folder, image_size=8, shard_size=4, shuffle_seed=None, fsync=False,
                           progress=crash_after_seven)
    assert sorted(p.name for p in root.iterdir()) == ["classes.json", "order.json", "shard_000000"]
    first = (root / "shard_000000" / "images.npy").stat().st_mtime_ns
    # The restarted job resumes after shard 0's last input id (5), without decoding 0..4 again.
    report = write_image_folder(root, folder, image_size=8, shard_size=4, shuffle_seed=None, fsync=False)
    assert report.samples_already_written == 4 and report.samples_written == 5
    assert (root / "shard_000000" / "images.npy").stat().st_mtime_ns == first
    assert read(root)["ids"].tolist() == [0, 2, 3, 4, 5, 6, 7, 8, 9]


def test_write_arrays_resume_and_ranges(tmp_path: Path) -> None:
    data = sample_arrays(11)
    write_arrays(tmp_path / "c", data, shard_size=4, num_shards=1, fsync=False)
    report = write_arrays(tmp_path / "c", data, shard_size=4, start_shard=0, fsync=False)
    assert report.samples_already_written == 4 and report.shards_written == [1, 2]
    got = read(tmp_path / "c")
    for name in data:
        np.testing.assert_array_equal(got[name], data[name])
    assert got["ids"].tolist() == list(range(11))
