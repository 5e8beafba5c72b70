"""Cached teacher targets on a float cache: the student replays, bit for bit, the input the teacher saw."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import shardstore.kd.teacher_cache as teacher_cache
import shardstore.kd.trainer as trainer_module
from shardstore.config.resolve import DEFAULT_DATA_CONFIG, DEFAULT_MODEL_CONFIG, DEFAULT_TRAIN_CONFIG, load_run_config
from shardstore.errors import ConfigError
from shardstore.kd.target_spec import read_target_spec
from shardstore.kd.teacher_cache import fill_teacher_cache
from shardstore.kd.teacher_check import check_teacher_cache
from shardstore.kd.trainer import train

from .conftest import overrides
from .test_own_cache import pixels, write_flat

CONFIGS = [DEFAULT_DATA_CONFIG, DEFAULT_TRAIN_CONFIG, DEFAULT_MODEL_CONFIG]
VIEWS = 2


def key(image: torch.Tensor, view: torch.Tensor) -> tuple[bytes, tuple[float, ...]]:
    """One (image, view) pair by the image's bytes in CHW order and the view's numbers."""
    return image.contiguous().view(torch.uint8).numpy().tobytes(), tuple(view.float().tolist())


CACHES = {
    "float16 CHW": (lambda x: x.astype(np.float16), {}),
    "bfloat16 HWC": (lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(0, 2, 3, 1))).to(torch.bfloat16)
                     .view(torch.int16).numpy(), {"data__image_dtype": "bfloat16"}),
    "float32 0-255 HWC": (lambda x: np.ascontiguousarray(x.transpose(0, 2, 3, 1)) * 255, {"data__image_scale": 255}),
}


@pytest.mark.parametrize("kind", list(CACHES))
@pytest.mark.slow
def test_fill_and_replay_on_a_float_cache_are_bit_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        kind: str) -> None:
    encode, keys = CACHES[kind]
    images, labels = pixels()
    cache = write_flat(tmp_path / "cache", {"images": encode(images), "labels": labels})
    settings = {"train__augment__flip": True, "train__eval__held_out_shards": 0, **keys}
    cfg = load_run_config(*CONFIGS, overrides(tmp_path / "fill", cache, **settings))

    seen: dict[tuple[bytes, tuple[float, ...]], torch.Tensor] = {}  # what the teacher was shown, by (image, view)
    real_render = teacher_cache.render_teacher_input

    def spy_render(batch, views, teacher):
        x = real_render(batch, views, teacher)
        for j in range(batch.shape[0]):
            seen[key(batch[j], views[j])] = x[j].clone()
        return x

    monkeypatch.setattr(teacher_cache, "render_teacher_input", spy_render)
    report = fill_teacher_cache(cfg, views=VIEWS, topk=3, fsync=False)
    assert report.images == len(images) and len(seen) == len(images) * VIEWS
    spec = read_target_spec(cache, "teacher")
    assert spec.image_shape == (3, 16, 16) and spec.image_format["dtype"] == kind.split()[0]

    renders = []
    real_apply = trainer_module.apply_views

    def spy_apply(batch, views, size):
        x = real_apply(batch, views, size)
        renders.append((batch.clone(), views.clone(), x.clone()))
        return x

    monkeypatch.setattr(trainer_module, "apply_views", spy_apply)
    student = load_run_config(*CONFIGS, overrides(tmp_path / "student", cache, data__teacher_targets="teacher",
                                                  train__epochs=1, train__max_steps_per_epoch=3, **settings))
    assert train(student).global_step == 3 and len(renders) == 3
    for batch, views, x in renders:
        for j in range(batch.shape[0]):
            assert torch.equal(x[j], seen[key(batch[j], views[j])]), "the replayed view differs from the teacher's"
    check = check_teacher_cache(cfg, samples=32)
    assert check.passed and check.worst_kl < 1e-4, check.failures


def test_targets_made_on_images_read_another_way_are_refused(tmp_path: Path) -> None:
    images, labels = pixels()
    cache = write_flat(tmp_path / "cache", {"images": images * 255, "labels": labels})
    fill = load_run_config(*CONFIGS, overrides(tmp_path / "fill", cache, data__image_scale=255))
    fill_teacher_cache(fill, views=VIEWS, topk=3, fsync=False)
    # read as normalised now: the replay would feed the student other pixels than the teacher saw
    student = load_run_config(*CONFIGS, overrides(tmp_path / "student", cache, data__teacher_targets="teacher",
                                                  data__image_normalized=True, train__epochs=1))
    with pytest.raises(ConfigError, match=r"the cached targets 'teacher' were made on images read with scale 255\.0, "
                                          r"this run reads them with 1\.0 \(data.image_scale\); set it back"):
        train(student)
    assert not (tmp_path / "student").exists()
    again = check_teacher_cache(load_run_config(*CONFIGS, overrides(tmp_path / "fill", cache)), samples=8)
    assert not again.passed and "read with scale 255.0, the data config reads them with 1.0 (data.image_scale)" \
        in again.failures[0]


def test_cache_teacher_on_a_float_cache_checks_it_first(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from shardstore.cli import main

    from .test_own_cache import data_config, sets

    images, labels = pixels()
    cache = write_flat(tmp_path / "cache", {"x": np.ascontiguousarray(images.transpose(0, 2, 3, 1)) * 255, "y": labels})
    plain = data_config(tmp_path / "plain.yaml", cache, image_field="x", label_field="y")
    capsys.readouterr()
    assert main(["cache-teacher", "--data_config", str(plain), *sets(tmp_path / "run"), "--views", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "reach 229.5, above data.image_scale 1" in err[0], err
    assert not (cache / "teacher.fields.json").exists()  # refused before anything was written
    scaled = data_config(tmp_path / "scaled.yaml", cache, image_field="x", label_field="y", image_scale=255)
    assert main(["cache-teacher", "--data_config", str(scaled), *sets(tmp_path / "run"), "--views", "2"]) == 0
    assert main(["cache-teacher", "--data_config", str(scaled), *sets(tmp_path / "run"), "--check", "16"]) == 0
    spec = read_target_spec(cache, "teacher")
    assert spec.image_field == "x" and spec.image_format == {"layout": "HWC", "dtype": "float32", "scale": 255.0,
                                                             "normalized": False, "repeat_gray": False}
