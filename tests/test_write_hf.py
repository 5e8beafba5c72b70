"""``shardstore write --from-hf``: a Hugging Face dataset built here (no network), saved with ``save_to_disk`` or as
Parquet/Arrow files, becomes a class-mixed cache of decoded images, the same byte for byte from every form of the
source, with any number of decoding processes, and after a SIGKILL and a restart; mistakes are one line."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from shardstore.cli import main
from shardstore.errors import ShardstoreError
from shardstore.store.decode import load_image
from shardstore.store.order import source_order

datasets = pytest.importorskip("datasets")

from shardstore.store.hf import hf_image_source  # noqa: E402  (after the skip: it needs datasets)
from shardstore.store.ingest import write_images  # noqa: E402

NAMES = ["ant", "bee", "cat", "dog"]
PER_CLASS = 12


def encoded(pixels: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    PILImage.fromarray(pixels).save(buf, format=fmt, quality=92)
    return buf.getvalue()


def class_ordered(per_class: int = PER_CLASS, side: int = 24, seed: int = 0) -> tuple[list[bytes], list[int]]:
    """Encoded images sorted by class (JPEG and PNG, several sizes); the red channel encodes the class."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label in range(len(NAMES)):
        for i in range(per_class):
            pixels = rng.integers(0, 255, (side + i % 3, side + 4 - i % 5, 3), dtype=np.uint8)
            pixels[..., 0] = 60 * label
            images.append(encoded(pixels, "PNG" if i % 2 else "JPEG"))
            labels.append(label)
    return images, labels


def make_dataset(images: list[bytes], labels: list[int]) -> datasets.Dataset:
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=NAMES)})
    return datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in images], "label": labels},
                                      features=features)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """One class-ordered dataset as a save_to_disk folder, a Parquet file, Arrow files and a DatasetDict folder."""
    datasets.disable_progress_bars()
    base = tmp_path_factory.mktemp("hf")
    images, labels = class_ordered()
    ds = make_dataset(images, labels)
    ds.save_to_disk(str(base / "saved"))
    ds.to_parquet(str(base / "data.parquet"))
    datasets.DatasetDict({"train": ds, "test": ds.select(range(0, len(ds), 4))}).save_to_disk(str(base / "dict"))
    return {"base": base, "images": images, "labels": np.asarray(labels), "saved": base / "saved",
            "parquet": base / "data.parquet", "dict": base / "dict"}


@pytest.fixture(autouse=True)
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """datasets converts Parquet into its cache: keep that inside the test's folder, and never reach the hub."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def digests(root: Path) -> dict[str, str]:
    """Every file of a cache but the manifest and its table (they record mtimes), by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "manifest.json"
            and p.relative_to(root).parts[0] != "manifest.d"}


def shards(root: Path, name: str) -> np.ndarray:
    return np.concatenate([np.load(d / f"{name}.npy") for d in sorted(root.glob("shard_*"))])


def write_cli(root: Path, src: object, *flags: object) -> int:
    return main(["write", str(root), "--from-hf", str(src), "--image-size", "16", "--shard-size", "8",
                 "--workers", "1", *map(str, flags)])


def one_line(args: list[object], capsys: pytest.CaptureFixture) -> str:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in captured.err, captured.err
    return lines[0].removeprefix("shardstore: error: ")


# --- what the cache holds ----------------------------------------------------------------------------------------


def test_a_saved_dataset_becomes_a_class_mixed_cache(source: dict, tmp_path: Path) -> None:
    root = tmp_path / "c"
    assert write_cli(root, source["saved"]) == 0
    n = len(source["labels"])
    ids, labels, images = shards(root, "ids"), shards(root, "labels"), shards(root, "images")
    assert ids.tolist() == source_order(n, 0).tolist()  # every row once, in the seeded order
    np.testing.assert_array_equal(labels, source["labels"][ids])
    for row in (0, 17, n - 1):  # decoded, resized and cropped exactly like an image folder
        np.testing.assert_array_equal(images[ids.tolist().index(row)], load_image(source["images"][row], 16))
    per_shard = [len(set(labels[lo : lo + 8].tolist())) for lo in range(0, n, 8)]
    assert min(per_shard) >= 3, per_shard  # the source is sorted by class: source order gives 1-2 per shard
    assert json.loads((root / "classes.json").read_text()) == NAMES
    assert (root / "manifest.json").exists()


def test_no_shuffle_keeps_the_source_order(source: dict, tmp_path: Path) -> None:
    assert write_cli(tmp_path / "c", source["saved"], "--no-shuffle") == 0
    assert shards(tmp_path / "c", "ids").tolist() == list(range(len(source["labels"])))
    np.testing.assert_array_equal(shards(tmp_path / "c", "labels"), source["labels"])


@pytest.mark.slow
def test_parquet_arrow_and_a_dataset_object_give_the_same_cache(source: dict, tmp_path: Path) -> None:
    assert write_cli(tmp_path / "saved", source["saved"]) == 0
    assert write_cli(tmp_path / "parquet", source["parquet"]) == 0
    assert write_cli(tmp_path / "glob", source["saved"] / "*.arrow") == 0
    assert write_cli(tmp_path / "dict", source["dict"]) == 0  # a DatasetDict: its train split by default
    ds = datasets.load_from_disk(str(source["saved"]))
    write_images(tmp_path / "object", hf_image_source(ds), image_size=16, shard_size=8, workers=1, fsync=False)
    want = digests(tmp_path / "saved")
    for other in ("parquet", "glob", "dict", "object"):
        assert digests(tmp_path / other) == want, other


def test_a_split_is_chosen_by_name(source: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert write_cli(tmp_path / "c", source["dict"], "--split", "test", "--no-shuffle") == 0
    assert shards(tmp_path / "c", "labels").tolist() == source["labels"][::4].tolist()
    loaded = datasets.load_from_disk(str(source["dict"]))  # a DatasetDict object, from Python
    assert hf_image_source(loaded, split="test").num_rows == len(source["labels"][::4])
    with pytest.raises(ShardstoreError,
                       match="^the dataset has type IterableDataset; an image source needs a map-style"):
        hf_image_source(loaded["train"].to_iterable_dataset())
    assert one_line(["write", tmp_path / "d", "--from-hf", source["dict"], "--split", "val"], capsys) == (
        f"{source['dict']} has no split 'val'; its splits are train, test")
    assert one_line(["write", tmp_path / "d", "--from-hf", source["saved"], "--split", "test"], capsys) == (
        f"{source['saved']} holds one dataset, not splits; drop --split test")


def test_a_selection_of_rows_is_respected(source: dict, tmp_path: Path) -> None:
    ds = datasets.load_from_disk(str(source["saved"])).select([40, 3, 25])  # an indices mapping over the table
    write_images(tmp_path / "c", hf_image_source(ds), image_size=16, shard_size=8, shuffle_seed=None, workers=1,
                 fsync=False)
    assert shards(tmp_path / "c", "labels").tolist() == source["labels"][[40, 3, 25]].tolist()
    np.testing.assert_array_equal(shards(tmp_path / "c", "images")[1], load_image(source["images"][3], 16))


def test_string_and_integer_labels(tmp_path: Path) -> None:
    images, labels = class_ordered(per_class=2)
    cells = [{"bytes": b, "path": None} for b in images]
    named = datasets.Dataset.from_dict({"img": cells, "species": [NAMES[::-1][i] for i in labels]},
                                       features=datasets.Features({"img": datasets.Image(),
                                                                   "species": datasets.Value("string")}))
    write_images(tmp_path / "s", hf_image_source(named, label_column="species"), image_size=8, shard_size=4,
                 shuffle_seed=None, workers=1, fsync=False)
    assert json.loads((tmp_path / "s" / "classes.json").read_text()) == sorted(NAMES)
    assert shards(tmp_path / "s", "labels").tolist() == [sorted(NAMES).index(NAMES[::-1][i]) for i in labels]
    plain = datasets.Dataset.from_dict({"img": [b for b in images], "labels": labels},
                                       features=datasets.Features({"img": datasets.Value("binary"),
                                                                   "labels": datasets.Value("int32")}))
    write_images(tmp_path / "i", hf_image_source(plain), image_size=8, shard_size=4, workers=1, fsync=False)
    assert not (tmp_path / "i" / "classes.json").exists()  # no names to record
    ids = shards(tmp_path / "i", "ids")
    assert shards(tmp_path / "i", "labels").tolist() == np.asarray(labels)[ids].tolist()


# --- decoding processes, bad images, kills -----------------------------------------------------------------------


def test_bad_images_are_skipped_or_stop_the_job_naming_the_row(tmp_path: Path) -> None:
    images, labels = class_ordered(per_class=3)
    images[5] = b"not an image"
    src = hf_image_source(make_dataset(images, labels))
    report = write_images(tmp_path / "skip", src, image_size=8, shard_size=4, workers=1, fsync=False)
    assert [what for what, _ in report.bad_inputs] == ["the dataset row 5 (column 'image')"]
    assert report.samples_written == 11 and 5 not in shards(tmp_path / "skip", "ids").tolist()
    with pytest.raises(ShardstoreError, match=r"^the dataset row 5 \(column 'image'\): cannot decode image \(cannot "
                                              r"identify an image format in 12 bytes\); fix or remove it, or pass "
                                              r"--on-error skip$"):
        write_images(tmp_path / "stop", src, image_size=8, shard_size=4, workers=1, on_error="stop", fsync=False)


@pytest.mark.slow
def test_three_decoding_processes_write_the_same_cache_as_one(source: dict, tmp_path: Path) -> None:
    images = list(source["images"])
    images[20] = b"\xff\xd8 truncated jpeg"
    src = hf_image_source(make_dataset(images, source["labels"].tolist()))
    reports = [write_images(tmp_path / f"w{w}", src, image_size=16, shard_size=8, workers=w, chunk_rows=5,
                            fsync=False) for w in (1, 3)]
    assert digests(tmp_path / "w1") == digests(tmp_path / "w3")
    assert reports[0].bad_inputs == reports[1].bad_inputs and len(reports[1].bad_inputs) == 1
    assert reports[1].samples_written == len(images) - 1


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to find the decoding processes")
def test_a_job_killed_by_sigkill_and_run_again_writes_the_same_cache(tmp_path: Path) -> None:
    images, labels = class_ordered(per_class=150, side=96, seed=1)  # 600 rows: long enough to kill mid-way
    make_dataset(images, labels).save_to_disk(str(tmp_path / "saved"))
    args = [sys.executable, "-m", "shardstore", "write", "--from-hf", str(tmp_path / "saved"), "--image-size", "64",
            "--shard-size", "25", "--workers", "2"]
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "hf-cache"), "HF_HUB_OFFLINE": "1"}
    subprocess.run([*args[:4], str(tmp_path / "whole"), *args[4:]], env=env, check=True, capture_output=True)
    want = digests(tmp_path / "whole")
    root = tmp_path / "killed"
    landed = 0
    for _ in range(3):  # kill at the first shard, then again mid-way, until a kill lands with shards left to write
        child = subprocess.Popen([*args[:4], str(root), *args[4:]], env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        before = len(list(root.glob("shard_*"))) if root.exists() else 0
        workers: set[int] = set()
        while child.poll() is None and (len(list(root.glob("shard_*"))) if root.exists() else 0) <= before:
            workers.update(_children(child.pid))
            time.sleep(0.002)
        if child.poll() is not None:
            break  # it finished before the kill
        child.send_signal(signal.SIGKILL)
        assert child.wait() == -signal.SIGKILL
        landed += 1
        deadline = time.monotonic() + 5
        while any(map(_alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert workers and not any(map(_alive, workers)), "decoding processes outlived the killed job"
        for shard in root.glob("shard_*"):  # every visible shard is one the uninterrupted job wrote
            for f in shard.iterdir():
                assert digests(root)[f"{shard.name}/{f.name}"] == want[f"{shard.name}/{f.name}"]
    assert landed >= 1
    print(f"\n--from-hf killed {landed} time(s) mid-write; the rerun equals an uninterrupted write")
    subprocess.run([*args[:4], str(root), *args[4:]], env=env, check=True, capture_output=True)
    assert digests(root) == want


# --- one-line mistakes -------------------------------------------------------------------------------------------


def test_without_datasets_the_error_names_the_extra(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    assert one_line(["write", tmp_path / "c", "--from-hf", tmp_path], capsys) == (
        "--from-hf needs the optional `datasets` package, which is not installed; install the extra with "
        "pip install \"shardstore[hf]\" (or pip install datasets)")
    assert not (tmp_path / "c").exists()


def test_column_mistakes_are_one_line_listing_the_columns(source: dict, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    saved = source["saved"]
    columns = "image (Image), label (ClassLabel(4 classes))"
    base = ["write", tmp_path / "c", "--from-hf", saved]
    assert one_line([*base, "--image-column", "pixels"], capsys) == (
        f"--image-column 'pixels' is not a column of {saved}; its columns are {columns}")
    assert one_line([*base, "--label-column", "target"], capsys) == (
        f"--label-column 'target' is not a column of {saved}; its columns are {columns}")
    assert one_line([*base, "--image-column", "label"], capsys) == (
        f"column 'label' of {saved} cannot be both the images and the labels; pass --image-column and "
        "--label-column")
    assert one_line([*base, "--image-column", "label", "--label-column", "image"], capsys).startswith(
        f"column 'label' of {saved} holds ClassLabel(4 classes), not images; pass --image-column with a column of")
    assert not (tmp_path / "c").exists()


def test_columns_that_cannot_be_guessed_are_one_line(tmp_path: Path) -> None:
    images, labels = class_ordered(per_class=1)
    cells = [{"bytes": b, "path": None} for b in images]
    two = datasets.Dataset.from_dict({"a": cells, "b": cells, "y": labels}, features=datasets.Features(
        {"a": datasets.Image(), "b": datasets.Image(), "y": datasets.ClassLabel(names=NAMES)}))
    with pytest.raises(ShardstoreError, match=r"^the dataset has 2 Image columns \(a, b\); choose one with "
                                              r"--image-column NAME$"):
        hf_image_source(two)
    assert hf_image_source(two, image_column="b").image_column == "b"
    scores = datasets.Dataset.from_dict({"image": cells, "label": [0.5] * len(cells)}, features=datasets.Features(
        {"image": datasets.Image(), "label": datasets.Value("float32")}))
    with pytest.raises(ShardstoreError, match=r"^column 'label' of the dataset holds float32; labels must be a "
                                              r"ClassLabel, integers or strings: pass --label-column with such a "
                                              r"column$"):
        hf_image_source(scores)
    unlabeled = datasets.Dataset.from_dict({"image": cells}, features=datasets.Features({"image": datasets.Image()}))
    with pytest.raises(ShardstoreError, match=r"^the dataset has no label column \(ClassLabel feature, or named "
                                              r"label or labels\); its columns are image \(Image\); pass "
                                              r"--label-column NAME$"):
        hf_image_source(unlabeled)


def test_source_mistakes_are_one_line(source: dict, tmp_path: Path, capsys: pytest.CaptureFixture,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    base = ["write", tmp_path / "c", "--from-hf"]
    assert one_line([*base, tmp_path / "missing.parquet"], capsys) == (
        f"{tmp_path / 'missing.parquet'} does not exist; pass a saved dataset folder, Parquet/Arrow files or a hub "
        "name")
    (tmp_path / "empty").mkdir()
    assert one_line([*base, tmp_path / "empty"], capsys).startswith(
        f"{tmp_path / 'empty'} holds neither a saved dataset (state.json or dataset_dict.json, written by "
        "save_to_disk)")
    assert one_line([*base, source["saved"], "--config", "full"], capsys) == (
        f"--config 'full' chooses a configuration of a hub dataset; {source['saved']} is local, drop --config")
    assert one_line([*base, tmp_path / "*.parquet"], capsys).endswith(": no files match; pass a saved dataset "
                                                                       "folder, Parquet/Arrow files or a hub name")
    assert one_line(["write", tmp_path / "c", "--from-folder", tmp_path, "--label-column", "y"], capsys) == (
        "--label-column applies to --from-hf only; drop it")

    def unreachable(*args: object, **kwargs: object) -> None:
        raise ConnectionError("Couldn't reach 'someone/pets' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    assert one_line([*base, "someone/pets"], capsys) == (
        "cannot load someone/pets from the Hugging Face hub (ConnectionError: Couldn't reach 'someone/pets' on the "
        "Hub (LocalEntryNotFoundError)); check the name, --config and --split, and that the hub is reachable (or "
        "save the dataset with save_to_disk where it is, and pass that folder)")
    assert not (tmp_path / "c").exists()


def test_more_source_mistakes_are_one_line(source: dict, tmp_path: Path) -> None:
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "a.parquet").write_bytes(source["parquet"].read_bytes())
    (tmp_path / "mixed" / "b.arrow").write_bytes(b"")
    with pytest.raises(ShardstoreError, match=r"mixed/\*: expected only .parquet or only .arrow files, found .arrow, "
                                              r".parquet; pass the files of one format$"):
        hf_image_source(str(tmp_path / "mixed" / "*"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "state.json").write_text("{")
    with pytest.raises(ShardstoreError, match=rf"^cannot load {re.escape(str(tmp_path / 'broken'))} from disk \(.+\); "
                                              r"check the files$"):
        hf_image_source(str(tmp_path / "broken"))
    ds = datasets.load_from_disk(str(source["saved"]))
    splits = datasets.DatasetDict({"a": ds, "b": ds})
    with pytest.raises(ShardstoreError, match=r"^the dataset has splits a, b; choose one with --split$"):
        hf_image_source(splits)
    gaps = datasets.Dataset.from_dict({"image": ds["image"][:3], "label": [1, None, 2]},
                                      features=datasets.Features({"image": datasets.Image(),
                                                                  "label": datasets.Value("int64")}))
    with pytest.raises(ShardstoreError, match=r"^column 'label' of the dataset has 1 rows without a label; filter "
                                              r"them out first, or pass --label-column with another column$"):
        hf_image_source(gaps)

