"""A user's own cache trains through the CLI: written by hand with ``np.save`` (flat layout), float16 or uint8,
CHW, HWC or grayscale, under any field names; its data_config.yaml says what the manifest cannot."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from shardstore.cli import main
from shardstore.config.resolve import DEFAULT_DATA_CONFIG, DEFAULT_MODEL_CONFIG, DEFAULT_TRAIN_CONFIG, load_run_config
from shardstore.kd.metrics import read_metrics
from shardstore.kd.trainable import build_student

from .conftest import TINY

CONFIGS = [DEFAULT_DATA_CONFIG, DEFAULT_TRAIN_CONFIG, DEFAULT_MODEL_CONFIG]
NUM_SHARDS, SHARD_SIZE, SIZE = 4, 24, 16


def pixels(seed: int = 0, n: int = NUM_SHARDS * SHARD_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Learnable images in [0, 1], float32 ``[n, 3, SIZE, SIZE]``: class c is a bright square placed by c."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    images = rng.uniform(0.0, 0.15, (n, 3, SIZE, SIZE)).astype(np.float32)
    for i, c in enumerate(labels):
        y, x = divmod(int(c), 4)
        images[i, :, 2 + 3 * y: 5 + 3 * y, 2 + 3 * x: 5 + 3 * x] = 0.9
    return images, labels


def write_flat(root: Path, fields: dict[str, np.ndarray], shard_size: int = SHARD_SIZE) -> Path:
    """``ROOT/<field>_<id>.npy`` with plain ``np.save``, as people write caches by hand; then build-manifest."""
    root.mkdir(parents=True)
    n = len(next(iter(fields.values())))
    for shard_id, lo in enumerate(range(0, n, shard_size)):
        for name, values in fields.items():
            np.save(root / f"{name}_{shard_id:06d}.npy", values[lo: lo + shard_size])
    assert main(["build-manifest", str(root)]) == 0
    return root


def data_config(path: Path, cache: Path, **keys) -> Path:
    path.write_text(yaml.safe_dump({"cache_root": str(cache), "shards_per_epoch": 2, "loader_threads": 1, **keys}))
    return path


def sets(run_dir: Path, **extra) -> list[str]:
    """``--set`` arguments for a tiny run: one epoch of at most 3 steps, one held-out shard evaluated."""
    values = {k: v for k, v in TINY.items() if not k.startswith("data.")}
    values |= {"train.run_dir": str(run_dir), "train.epochs": 1, "train.max_steps_per_epoch": 3,
               "train.eval.held_out_shards": 1, **{k.replace("__", "."): v for k, v in extra.items()}}
    out = []
    for k, v in values.items():
        out += ["--set", f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"]
    return out


def train_cli(tmp_path: Path, cache: Path, data_keys: dict, capsys: pytest.CaptureFixture, **extra) -> Path:
    """``shardstore train --data_config F --set ...`` must succeed; returns the run directory."""
    run = tmp_path / "run"
    config = data_config(tmp_path / "data_config.yaml", cache, **data_keys)
    code = main(["train", "--data_config", str(config), *sets(run, **extra)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    records = read_metrics(run)
    steps = [r for r in records if r["kind"] == "step"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert len(steps) == 3 and all(np.isfinite(r["loss"]) for r in steps)
    assert epochs and "eval_top1" in epochs[-1]  # the held-out shard was evaluated through the same format
    return run


# -- each kind of cache trains through the CLI ----------------------------------------------------------------------


def test_a_float16_chw_cache_trains(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    images, labels = pixels()
    cache = write_flat(tmp_path / "cache", {"images": images.astype(np.float16), "labels": labels})
    train_cli(tmp_path, cache, {}, capsys)  # float16 in [0, 1], CHW: nothing to say


def test_an_hwc_uint8_cache_trains(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    images, labels = pixels()
    hwc = np.ascontiguousarray((images * 255).round().astype(np.uint8).transpose(0, 2, 3, 1))
    cache = write_flat(tmp_path / "cache", {"images": hwc, "labels": labels})
    train_cli(tmp_path, cache, {}, capsys)  # [16, 16, 3]: the layout is read from the manifest


@pytest.mark.parametrize("how", ["repeat_gray", "one-channel networks"])
def test_a_grayscale_cache_trains(tmp_path: Path, capsys: pytest.CaptureFixture, how: str) -> None:
    images, labels = pixels()
    gray = (images.mean(axis=1) * 255).round().astype(np.uint8)  # [N, H, W]: no channel axis at all
    cache = write_flat(tmp_path / "cache", {"images": gray, "labels": labels})
    if how == "repeat_gray":
        train_cli(tmp_path, cache, {"repeat_gray": True}, capsys)
    else:
        one = {"mean": [0.5], "std": [0.5], "size": SIZE}
        train_cli(tmp_path, cache, {}, capsys, model__student__input=one, model__teacher__input=one)


def test_a_cache_with_fields_x_and_y_trains(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    images, labels = pixels()
    cache = write_flat(tmp_path / "cache", {"x": (images * 255).round().astype(np.uint8),
                                            "y": labels.astype(np.int32)[:, None]})  # int32 [N, 1] labels too
    train_cli(tmp_path, cache, {"image_field": "x", "label_field": "y"}, capsys)


def test_bfloat16_caches_train(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """bfloat16 bits in int16 files (torch: ``t.view(torch.int16).numpy()``) and ml_dtypes' ``V2`` files."""
    images, labels = pixels()
    bits = torch.from_numpy(images).to(torch.bfloat16).view(torch.int16).numpy()
    for name, written, keys in [("bits", bits, {"image_dtype": "bfloat16"}),
                                ("v2", bits.view(np.dtype("V2")), {})]:  # V2: how ml_dtypes saves bfloat16
        cache = write_flat(tmp_path / name / "cache", {"images": written, "labels": labels})
        assert np.load(cache / "images_000000.npy").dtype == written.dtype
        train_cli(tmp_path / name, cache, keys, capsys)


@pytest.mark.parametrize("scaled", ["0-255 floats", "normalised floats"])
def test_float32_caches_say_their_scale(tmp_path: Path, capsys: pytest.CaptureFixture, scaled: str) -> None:
    images, labels = pixels()
    if scaled == "0-255 floats":
        cache = write_flat(tmp_path / "cache", {"images": images * 255, "labels": labels})
        train_cli(tmp_path, cache, {"image_scale": 255}, capsys)
    else:
        normalised = (images - 0.45) / 0.25
        cache = write_flat(tmp_path / "cache", {"images": normalised, "labels": labels})
        train_cli(tmp_path, cache, {"image_normalized": True}, capsys)


def test_normalised_images_skip_the_networks_mean_and_std(tmp_path: Path) -> None:
    images, labels = pixels()
    cache = write_flat(tmp_path / "cache", {"images": (images - 0.5) / 0.25, "labels": labels})
    cfg = load_run_config(*CONFIGS, [f"data.cache_root={cache}", "data.image_normalized=true",
                                     "model.student.name=cnn_small", "model.student.input.mean=[0.1, 0.2, 0.3]"])
    student = build_student(cfg)
    assert student.mean.flatten().tolist() == [0.0, 0.0, 0.0] and student.std.flatten().tolist() == [1.0, 1.0, 1.0]
    cfg = load_run_config(*CONFIGS, [f"data.cache_root={cache}", "model.student.name=cnn_small",
                                     "model.student.input.mean=[0.5]", "model.student.input.std=[0.25]"])
    student = build_student(cfg)  # one value each: a 1-channel network
    assert student.model(torch.zeros(2, 1, SIZE, SIZE)).shape == (2, 10)
