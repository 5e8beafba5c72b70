"""Every mismatch between a user's cache and the configs is one line (exit 2) before the first step, naming the key.

"Before the first step" is checked by the run directory: the trainer makes it only once the
data and the networks are known good, so a refused run leaves none behind.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from shardstore.cli import main

from .test_own_cache import data_config, pixels, sets, write_flat


def uint8(images: np.ndarray) -> np.ndarray:
    return (images * 255).round().astype(np.uint8)


def cache_of(kind: str) -> dict[str, np.ndarray]:
    images, labels = pixels()
    return {
        "rgb": {"images": uint8(images), "labels": labels},
        "int32 images": {"images": uint8(images).astype(np.int32), "labels": labels},
        "int16 images": {"images": uint8(images).astype(np.int16), "labels": labels},
        "float16": {"images": images.astype(np.float16), "labels": labels},
        "ambiguous": {"images": uint8(images)[:, :, :, :3], "labels": labels},  # [3, 16, 3]
        "8 channels": {"images": np.concatenate([uint8(images)[:, :2]] * 4, axis=1)[:, :, :, :8], "labels": labels},
        "flat pixels": {"images": uint8(images).reshape(len(images), -1), "labels": labels},  # [768]: 1-d
        "gray": {"images": uint8(images.mean(axis=1)), "labels": labels},
        "label 12": {"images": uint8(images), "labels": np.where(labels == 3, 12, labels)},
        "label -2": {"images": uint8(images), "labels": labels - 2},
        "float labels": {"images": uint8(images), "labels": labels.astype(np.float32)},
        "one-hot labels": {"images": uint8(images), "labels": np.eye(10, dtype=np.int64)[labels]},
        "0-255 floats": {"images": images * 255, "labels": labels},
        "normalised floats": {"images": (images - 0.5) / 0.25, "labels": labels},
        "nan": {"images": np.where(images > 0.85, np.nan, images).astype(np.float32), "labels": labels},
        "targets": {"images": uint8(images), "targets": labels},
    }[kind]


CASES = [
    # (cache, data_config keys, --set extras, what the line must say)
    ("int32 images", {}, {}, r"the images 'images' \(int32\[3, 16, 16\]\) have a dtype shardstore does not read; "
                             r"write them as uint8, uint16, float16, bfloat16 or float32"),
    ("rgb", {"image_dtype": "bfloat16"}, {}, r"data.image_dtype: bfloat16 .* remove image_dtype"),
    ("int16 images", {}, {}, r"are 16-bit integers: if they hold bfloat16 bits, set data.image_dtype: bfloat16"),
    ("ambiguous", {}, {}, r"cannot tell which axis of the images 'images' \(uint8\[3, 16, 3\]\) holds the channels; "
                          r"set data.image_layout: CHW \(channels first\) or HWC \(channels last\)"),
    ("8 channels", {}, {}, r"cannot tell .* set data.image_layout"),
    ("flat pixels", {}, {}, r"are not \[C, H, W\], \[H, W, C\] or \[H, W\] per sample.* set data.image_field"),
    ("gray", {}, {}, r"have 1 channel \(grayscale\) and model.student takes 3; set data.repeat_gray: true, or make "
                     r"it a 1-channel network \(model.student.input.mean and std with one value each\)"),
    ("rgb", {"repeat_gray": True}, {}, r"data.repeat_gray is true, but the images .* have 3 channels .* remove "
                                       r"repeat_gray"),
    ("rgb", {}, {"model.student.input": {"mean": [0.5], "std": [0.5], "size": 16}},
     r"the images 'images' \(CHW \[3, 16, 16\]\) give 3 channels and model.student takes 1; give "
     r"model.student.input.mean and std one value per channel, or set data.image_layout"),
    ("rgb", {}, {"model.teacher.kwargs": {"width": 8, "in_chans": 1}},
     r"model_config: teacher.kwargs.in_chans is 1, but teacher.input.mean and std have 3 values"),
    ("rgb", {"image_layout": "HWC"}, {}, r"give 16 channels and model.student takes 3: data.image_layout is HWC, "
                                          r"which reads the wrong axis as channels; set data.image_layout: CHW"),
    ("label 12", {}, {}, r"the labels 'labels' in .* go up to 12 \(shard \d+\), but model.num_classes is 10; set "
                         r"model.num_classes to at least 13, or set data.label_field to the class labels"),
    ("label -2", {}, {}, r"the labels 'labels' in .* include -2 \(shard \d+\); labels are class indices from 0 "
                         r"to model.num_classes - 1 \(or -1: unlabeled\)"),
    ("float labels", {}, {}, r"the labels 'labels' \(float32\[\]\) are not integers; .* set data.label_field"),
    ("one-hot labels", {}, {}, r"the labels 'labels' \(int64\[10\]\) are not one integer per sample .* "
                               r"set data.label_field"),
    ("0-255 floats", {}, {}, r"the images 'images' \(first 16 of shard 0\) reach 229\.5, above data.image_scale 1 "
                             r"\(the stored value of white\); set data.image_scale to the stored range"),
    ("normalised floats", {}, {}, r"go down to -1\.99\d*; pixel values are not negative: set "
                                  r"data.image_normalized: true"),
    ("normalised floats", {"image_scale": 4}, {}, r"go down to -1\.99\d*; .* data.image_normalized: true"),
    ("nan", {}, {}, r"hold NaN or infinite values"),
    ("float16", {"image_normalized": True, "image_field": "images"}, {"data.image_scale": 2},
     r"`image_scale` and `image_normalized: true` are both set"),
    ("rgb", {"image_normalized": True}, {}, r"data.image_normalized is true, but the images .* are integers"),
    ("rgb", {"image_field": "pixels"}, {}, r"the cache .* has no field 'pixels' \(it has images, labels\); set "
                                           r"data.image_field to the field that holds the images"),
    ("targets", {}, {}, r"has no field 'labels' \(it has images, targets\); set data.label_field to the field that "
                        r"holds the class labels"),
    ("rgb", {"image_field": "labels", "label_field": "labels"}, {}, r"`image_field` and `label_field` are both"),
    ("rgb", {"image_layout": "hwc"}, {}, r"`image_layout` must be one of CHW, HWC or null, got 'hwc'"),
]


@pytest.mark.parametrize("kind, keys, extra, message", CASES,
                         ids=[f"{c[0]}-{'-'.join(c[1]) or '-'.join(c[2]) or 'defaults'}" for c in CASES])
@pytest.mark.slow
def test_each_mismatch_is_one_line_before_the_first_step(tmp_path: Path, capsys: pytest.CaptureFixture, kind: str,
                                                         keys: dict, extra: dict, message: str) -> None:
    cache = write_flat(tmp_path / "cache", cache_of(kind))
    run = tmp_path / "run"
    config = data_config(tmp_path / "data_config.yaml", cache, **keys)
    capsys.readouterr()
    code = main(["train", "--data_config", str(config), *sets(run, **{k.replace(".", "__"): v
                                                                       for k, v in extra.items()})])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert re.search(message, err[0]), err[0]
    assert not run.exists()  # refused before the run (and its first step) began


@pytest.mark.parametrize("layout", ["CHW", "HWC"])
def test_the_layout_key_settles_an_ambiguous_shape(tmp_path: Path, capsys: pytest.CaptureFixture, layout: str) -> None:
    cache = write_flat(tmp_path / "cache", cache_of("ambiguous"))  # [3, 16, 3]: 3 channels first and last
    config = data_config(tmp_path / "data_config.yaml", cache, image_layout=layout)
    assert main(["train", "--data_config", str(config), *sets(tmp_path / "run")]) == 0, capsys.readouterr().err


@pytest.mark.slow
def test_an_evaluation_cache_is_read_like_the_training_cache(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    images, labels = pixels()
    train_cache = write_flat(tmp_path / "train", {"x": images.astype(np.float16), "y": labels})
    config = data_config(tmp_path / "data_config.yaml", train_cache, image_field="x", label_field="y")
    same = write_flat(tmp_path / "same", {"x": images[:24].astype(np.float16), "y": labels[:24]})
    assert main(["train", "--data_config", str(config),
                 *sets(tmp_path / "ok", train__eval__held_out_shards=0, train__eval__cache_root=str(same))]) == 0
    other = write_flat(tmp_path / "other", {"x": uint8(images[:24]), "y": np.where(labels[:24] == 1, 10, labels[:24])})
    capsys.readouterr()
    for cache, message in [(other, r"the evaluation cache .* holds uint8 CHW images of 3 channels, the training cache "
                                   r"float16 CHW of 3; write both the same way"),
                           (write_flat(tmp_path / "labels", {"x": images[:24].astype(np.float16),
                                                             "y": np.where(labels[:24] == 1, 10, labels[:24])}),
                            r"the labels 'y' in .*labels go up to 10 \(shard 0\), but model.num_classes is 10")]:
        code = main(["train", "--data_config", str(config),
                     *sets(tmp_path / "bad", train__eval__held_out_shards=0, train__eval__cache_root=str(cache))])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and re.search(message, err[0]), err
        assert not (tmp_path / "bad").exists()
