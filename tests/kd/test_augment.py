"""Device augmentation: views drawn like RandomResizedCrop, seeded per (seed, step), applied exactly and replayably."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shardstore.errors import ConfigError
from shardstore.kd.augment import AugmentSpec, DeviceAugment, apply_views, center_views, draw_views, view_generator

HEIGHT, WIDTH = 480, 640


def crafted_images(batch: int = 2, side: int = 16, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, side, side), dtype=torch.uint8, generator=gen)


def reference_resize(images: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=False) / 255


def test_views_lie_inside_the_image_with_area_and_ratio_in_range() -> None:
    spec = AugmentSpec(size=32)
    views = draw_views(4000, HEIGHT, WIDTH, spec, torch.Generator().manual_seed(0))
    assert views.dtype == torch.float32 and views.shape == (4000, 5) and views.device.type == "cpu"
    top, left, crop_h, crop_w, flip = views.double().unbind(1)
    assert torch.equal(views, views.round()), "boxes are whole pixels"
    assert (top >= 0).all() and (left >= 0).all() and (crop_h >= 1).all() and (crop_w >= 1).all()
    assert (top + crop_h <= HEIGHT).all() and (left + crop_w <= WIDTH).all()
    # the fallback (whole image here, ratio 4/3) is inside the ranges too; rounding moves a box by < 0.5 px a side
    area = crop_h * crop_w / (HEIGHT * WIDTH)
    ratio = crop_w / crop_h
    assert area.min() >= 0.35 * 0.995 and area.max() <= 1.0
    assert ratio.min() >= 0.75 * 0.995 and ratio.max() <= 4 / 3 * 1.005
    # the whole ranges are used, offsets reach both ends, and about half the views flip
    assert area.min() < 0.37 and area.max() > 0.97 and ratio.min() < 0.77 and ratio.max() > 1.3
    assert (top == 0).any() and (left + crop_w == WIDTH).any()
    assert set(flip.tolist()) == {0.0, 1.0} and 0.45 < flip.mean() < 0.55


def test_offsets_are_uniform_over_every_position() -> None:
    # a 3x3 box in a 4x5 image: top in {0, 1}, left in {0, 1, 2}, each equally likely
    spec = AugmentSpec(size=8, scale=(0.45, 0.5), ratio=(1.0, 1.0))
    views = draw_views(6000, 4, 5, spec, torch.Generator().manual_seed(2))
    assert (views[:, 2:4] == 3).all()
    tops = torch.bincount(views[:, 0].long(), minlength=2)
    lefts = torch.bincount(views[:, 1].long(), minlength=3)
    assert tops.shape == (2,) and lefts.shape == (3,)
    assert (tops - 3000).abs().max() < 200 and (lefts - 2000).abs().max() < 200


@pytest.mark.parametrize(("height", "width", "ratio", "expected"), [
    (100, 100, (3.0, 4.0), [33, 0, 33, 100]),  # too wide for the image: central crop at the lowest ratio
    (100, 400, (0.5, 1.0), [0, 150, 100, 100]),  # image wider than the highest ratio allows
])
def test_no_fitting_attempt_falls_back_to_a_central_crop(height: int, width: int, ratio: tuple, expected: list) -> None:
    spec = AugmentSpec(size=8, scale=(0.99, 1.0), ratio=ratio, flip=False)
    views = draw_views(50, height, width, spec, torch.Generator().manual_seed(3))
    assert torch.equal(views, torch.tensor([expected + [0]] * 50, dtype=torch.float32))


def test_whole_image_without_random_crop_and_no_flip_without_flip() -> None:
    views = draw_views(64, 30, 40, AugmentSpec(size=8, random_resized_crop=False), torch.Generator().manual_seed(1))
    assert torch.equal(views[:, :4], torch.tensor([[0.0, 0.0, 30.0, 40.0]]).expand(64, 4))
    assert views[:, 4].sum() > 0
    no_flip = draw_views(64, 30, 40, AugmentSpec(size=8, flip=False), torch.Generator().manual_seed(1))
    assert (no_flip[:, 4] == 0).all() and (no_flip[:, 2] < 30).any()
    assert torch.equal(center_views(3, 30, 40), torch.tensor([[0.0, 0.0, 30.0, 40.0, 0.0]] * 3))


def test_views_are_reproducible_for_a_seed() -> None:
    spec = AugmentSpec(size=32)
    first = draw_views(256, HEIGHT, WIDTH, spec, torch.Generator().manual_seed(7))
    assert torch.equal(first, draw_views(256, HEIGHT, WIDTH, spec, torch.Generator().manual_seed(7)))
    assert not torch.equal(first, draw_views(256, HEIGHT, WIDTH, spec, torch.Generator().manual_seed(8)))


def test_step_seeding_differs_by_step_and_does_not_collide_like_a_sum() -> None:
    spec = AugmentSpec(size=32)

    def views(seed: int, step: int) -> torch.Tensor:
        return draw_views(64, HEIGHT, WIDTH, spec, view_generator(seed, step))

    assert torch.equal(views(5, 3), views(5, 3))
    assert not torch.equal(views(5, 3), views(5, 4))
    assert not torch.equal(views(1, 0), views(0, 1))  # seed + step would give both the same stream
    images = crafted_images(batch=4, side=24)
    aug = DeviceAugment(AugmentSpec(size=16), seed=1)
    batch, drawn = aug(images, step=0)
    assert not torch.equal(drawn, DeviceAugment(AugmentSpec(size=16), seed=0)(images, step=1)[1])
    # a resumed run (a new object) replays the same step exactly
    again, drawn_again = DeviceAugment(AugmentSpec(size=16), seed=1)(images, step=0)
    assert torch.equal(drawn, drawn_again) and torch.equal(batch, again)
    assert batch.shape == (4, 3, 16, 16) and batch.dtype == torch.float32
    assert torch.equal(batch, apply_views(images, drawn, 16))


def test_full_view_is_the_resized_image() -> None:
    images = crafted_images()
    same = apply_views(images, center_views(2, 16, 16), 16)
    assert same.dtype == torch.float32 and same.shape == (2, 3, 16, 16)
    assert torch.equal(reference_resize(images, 16), images / 255)
    torch.testing.assert_close(same, images / 255, rtol=0, atol=1e-5)
    for size in (7, 10, 24):
        torch.testing.assert_close(apply_views(images, center_views(2, 16, 16), size),
                                   reference_resize(images, size), rtol=0, atol=1e-5)


@pytest.mark.parametrize("size", [16, 9, 24])
def test_flip_reverses_columns_exactly(size: int) -> None:
    images = crafted_images()
    views = torch.tensor([[2.0, 3.0, 11.0, 9.0, 0.0], [0.0, 0.0, 16.0, 16.0, 0.0]])
    flipped = views.clone()
    flipped[:, 4] = 1.0
    assert torch.equal(apply_views(images, flipped, size), apply_views(images, views, size).flip(-1))


def test_crops_equal_crop_then_resize() -> None:
    images = crafted_images()
    quadrant = apply_views(images, torch.tensor([[0.0, 0.0, 8.0, 8.0, 0.0]] * 2), 16)
    torch.testing.assert_close(quadrant, reference_resize(images[:, :, :8, :8], 16), rtol=0, atol=1e-5)
    # an inner box: samples near its edges read only pixels inside it
    inner = apply_views(images, torch.tensor([[3.0, 5.0, 7.0, 9.0, 0.0]] * 2), 13)
    torch.testing.assert_close(inner, reference_resize(images[:, :, 3:10, 5:14], 13), rtol=0, atol=1e-5)


def test_replay_is_bit_exact_and_per_sample() -> None:
    images = crafted_images(batch=8, side=40, seed=2)
    views = draw_views(8, 40, 40, AugmentSpec(size=24), torch.Generator().manual_seed(4))
    out = apply_views(images, views, 24)
    assert torch.equal(out, apply_views(images.clone(), views.clone(), 24))
    assert out.min() >= 0.0 and out.max() <= 1.0
    # each sample depends only on its own image and view
    assert torch.equal(out[3:5], apply_views(images[3:5], views[3:5], 24))


def test_bad_inputs() -> None:
    with pytest.raises(ConfigError, match="`size` must be a positive integer, got 0"):
        AugmentSpec(size=0)
    with pytest.raises(ConfigError, match=r"`scale` must satisfy 0 < low <= high <= 1, got \(0.5, 0.2\)"):
        AugmentSpec(size=8, scale=(0.5, 0.2))
    with pytest.raises(ConfigError, match=r"`ratio` must satisfy 0 < low <= high, got \(0.0, 1.0\)"):
        AugmentSpec(size=8, ratio=(0.0, 1.0))
    with pytest.raises(ConfigError, match=r"`ratio` must be two numbers \[low, high\], got 1.0"):
        AugmentSpec(size=8, ratio=1.0)  # type: ignore[arg-type]
    assert AugmentSpec(size=8, scale=[0.5, 1]).scale == (0.5, 1.0)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="seed must be non-negative, got -1"):
        DeviceAugment(AugmentSpec(size=8), seed=-1)
    with pytest.raises(TypeError, match=r"images must be uint8 or float \[B, C, H, W\], got torch.int32"):
        apply_views(torch.zeros(1, 3, 4, 4, dtype=torch.int32), center_views(1, 4, 4), 4)
    with pytest.raises(TypeError, match=r"images must be uint8 or float \[B, C, H, W\], got torch.uint8 \[3, 4, 4\]"):
        apply_views(torch.zeros(3, 4, 4, dtype=torch.uint8), center_views(1, 4, 4), 4)
    with pytest.raises(ValueError, match=r"views must be \[1, 5\], got \[2, 5\]"):
        apply_views(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), center_views(2, 4, 4), 4)
