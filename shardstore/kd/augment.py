"""Batched crop-resize-flip of images on their device, from explicit view parameters that can be replayed.

A view is five numbers per sample, ``(top, left, crop_h, crop_w, flip)``, in pixels of the
source image. Views are drawn on a CPU generator seeded from ``(seed, step)``, so a resumed
run draws the same views for the same step, and they are small enough to store next to
cached teacher outputs: ``apply_views`` on the same images and views gives the same bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from shardstore.errors import ConfigError
from shardstore.sampling.seeds import words_for

#: columns of a view tensor
TOP, LEFT, CROP_H, CROP_W, FLIP = range(5)
#: tries of area and aspect ratio before falling back to a central crop, as torchvision does
ATTEMPTS = 10


@dataclass(frozen=True)
class AugmentSpec:
    """How training views are drawn."""

    #: side of the square output, in pixels
    size: int
    #: draw a random box of random area and aspect ratio (else the whole image)
    random_resized_crop: bool = True
    #: range of the box area, as a fraction of the image area
    scale: tuple[float, float] = (0.35, 1.0)
    #: range of the box aspect ratio, width / height
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    #: mirror left-right with probability 0.5
    flip: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ConfigError(f"augment `size` must be a positive integer, got {self.size!r}")
        scale = _pair("scale", self.scale)
        ratio = _pair("ratio", self.ratio)
        if not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise ConfigError(f"augment `scale` must satisfy 0 < low <= high <= 1, got {scale}; e.g. (0.35, 1.0)")
        if not 0.0 < ratio[0] <= ratio[1]:
            raise ConfigError(f"augment `ratio` must satisfy 0 < low <= high, got {ratio}; e.g. (0.75, 1.333)")
        object.__setattr__(self, "scale", scale)  # lists from YAML become hashable tuples
        object.__setattr__(self, "ratio", ratio)


def _pair(name: str, value: object) -> tuple[float, float]:
    """Two floats from a tuple or list, or a ConfigError naming the key."""
    try:
        low, high = (float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ConfigError(f"augment `{name}` must be two numbers [low, high], got {value!r}") from None
    return low, high


def draw_views(n: int, height: int, width: int, spec: AugmentSpec, generator: torch.Generator) -> Tensor:
    """Views for ``n`` images of ``height`` x ``width``: float32 ``[n, 5]`` on the CPU.

    Follows torchvision's ``RandomResizedCrop.get_params`` per sample, vectorised: up to 10
    attempts of an area fraction uniform in ``spec.scale`` and a log-uniform aspect ratio in
    ``spec.ratio``; the first attempt whose rounded box fits is placed uniformly at integer
    offsets; a sample with no fitting attempt gets the central crop of the image clamped to
    the ratio range. All random numbers come from ``generator`` (a CPU generator), in a fixed
    order, so a seed always gives the same views.
    """
    if n < 0 or height < 1 or width < 1:
        raise ValueError(f"need n >= 0 and a non-empty image, got n={n}, height={height}, width={width}")
    views = torch.zeros(n, 5, dtype=torch.float64)
    views[:, CROP_H] = height
    views[:, CROP_W] = width
    if spec.random_resized_crop and n:
        views[:, :4] = _random_boxes(n, height, width, spec, generator)
    if spec.flip and n:
        views[:, FLIP] = (torch.rand(n, generator=generator, dtype=torch.float64) < 0.5).double()
    return views.float()


def _random_boxes(n: int, height: int, width: int, spec: AugmentSpec, generator: torch.Generator) -> Tensor:
    """``[n, 4]`` float64 boxes ``(top, left, crop_h, crop_w)`` with integer values."""
    area = float(height * width)
    scale_u = torch.rand(n, ATTEMPTS, generator=generator, dtype=torch.float64)
    ratio_u = torch.rand(n, ATTEMPTS, generator=generator, dtype=torch.float64)
    place_u = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    target_area = area * (spec.scale[0] + (spec.scale[1] - spec.scale[0]) * scale_u)
    log_low, log_high = math.log(spec.ratio[0]), math.log(spec.ratio[1])
    aspect = torch.exp(log_low + (log_high - log_low) * ratio_u)
    # torch.round rounds half to even, like Python's round() in torchvision
    crop_w = torch.round(torch.sqrt(target_area * aspect))
    crop_h = torch.round(torch.sqrt(target_area / aspect))
    fits = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # first fitting attempt (0 when none fits)
    crop_h = crop_h.gather(1, first).squeeze(1)
    crop_w = crop_w.gather(1, first).squeeze(1)
    # uniform integer offset in [0, side - crop]; the min guards against u rounding up to 1.0
    top = torch.minimum(torch.floor(place_u[:, 0] * (height - crop_h + 1)), height - crop_h)
    left = torch.minimum(torch.floor(place_u[:, 1] * (width - crop_w + 1)), width - crop_w)
    boxes = torch.stack([top, left, crop_h, crop_w], dim=1)
    fallback = ~fits.any(dim=1)
    if fallback.any():
        boxes[fallback] = torch.tensor(_central_box(height, width, spec.ratio), dtype=torch.float64)
    return boxes


def _central_box(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """torchvision's fallback: the largest central box whose aspect ratio is clamped to ``ratio``."""
    in_ratio = width / height
    if in_ratio < ratio[0]:
        crop_w, crop_h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        crop_h, crop_w = height, int(round(height * ratio[1]))
    else:
        crop_h, crop_w = height, width
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def center_views(n: int, height: int, width: int) -> Tensor:
    """Views of the whole image without flip, for evaluation: float32 ``[n, 5]`` on the CPU."""
    views = torch.zeros(n, 5, dtype=torch.float32)
    views[:, CROP_H] = height
    views[:, CROP_W] = width
    return views


def view_grid(views: Tensor, height: int, width: int, size: int, device: torch.device) -> Tensor:
    """The ``[B, size, size, 2]`` float32 sampling grid of ``views`` over ``height`` x ``width`` images, on ``device``.

    With ``align_corners=False`` the normalised coordinate -1 is the left edge of the first
    pixel and +1 the right edge of the last: pixel ``u`` spans ``[u, u + 1)``, i.e.
    ``[2u / W - 1, 2(u + 1) / W - 1)``. A box with left edge ``left`` and width ``crop_w``
    therefore spans ``[2 left / W - 1, 2 (left + crop_w) / W - 1]``, and the output's
    ``[-1, 1]`` is mapped onto it by ``x_in = a x_out + b`` with ``a = crop_w / W`` and
    ``b = (2 left + crop_w) / W - 1`` (likewise for y with ``top``, ``crop_h`` and ``H``); a flip
    negates ``a``. Output pixel ``k`` of ``size`` then samples source column
    ``left + (k + 0.5) crop_w / size - 0.5``, the point ``F.interpolate(mode="bilinear",
    align_corners=False)`` samples. Sample points are finally clamped to the centres of the
    box's first and last pixels, so, as in crop-then-resize, the output depends only on the
    pixels inside the box (near its edges, bilinear would otherwise blend in its neighbours).
    The matrices are computed in float64 on the views' device, then cast.
    """
    v = views.to(torch.float64)
    top, left, crop_h, crop_w, flip = v.unbind(dim=1)
    theta = torch.zeros(v.shape[0], 2, 3, dtype=torch.float64, device=v.device)
    theta[:, 0, 0] = (1.0 - 2.0 * flip) * crop_w / width  # flip == 1: output column k reads the mirrored column
    theta[:, 0, 2] = (2.0 * left + crop_w) / width - 1.0
    theta[:, 1, 1] = crop_h / height
    theta[:, 1, 2] = (2.0 * top + crop_h) / height - 1.0
    # normalised coordinates of the centres of the box's first and last pixels, as (x, y)
    low = torch.stack([(2.0 * left + 1.0) / width, (2.0 * top + 1.0) / height], dim=1) - 1.0
    high = torch.stack([(2.0 * (left + crop_w) - 1.0) / width, (2.0 * (top + crop_h) - 1.0) / height], dim=1) - 1.0
    theta, low, high = (t.to(device=device, dtype=torch.float32) for t in (theta, low, high))
    grid = F.affine_grid(theta, [v.shape[0], 1, size, size], align_corners=False)
    return torch.maximum(torch.minimum(grid, high[:, None, None, :]), low[:, None, None, :])


def apply_views(images: Tensor, views: Tensor, size: int) -> Tensor:
    """Crop each image to its view's box, resize it to ``size`` x ``size`` bilinearly and flip it where asked.

    ``images`` is ``[B, C, H, W]`` on any device: uint8 (0 to 255, returned in [0, 1]) or any
    float dtype, whose values are interpolated as they are (``shardstore.kd.images`` brings a
    cache's values into the networks' range first); ``views`` is ``[B, 5]`` on any device (see
    ``view_grid`` for how a box maps to the sampling grid). Returns float32 ``[B, C, size, size]``
    on the images' device; the arithmetic is float32 for every input dtype. No antialiasing:
    shrinking a large box aliases as ``F.interpolate(antialias=False)`` does. The same images
    and views give the same bits (grid_sample's forward pass is deterministic).
    """
    if images.dim() != 4 or not (images.dtype == torch.uint8 or images.is_floating_point()):
        raise TypeError(f"images must be uint8 or float [B, C, H, W], got {images.dtype} {list(images.shape)}")
    if views.dim() != 2 or views.shape != (images.shape[0], 5):
        raise ValueError(f"views must be [{images.shape[0]}, 5], got {list(views.shape)}")
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    _, _, height, width = images.shape
    grid = view_grid(views, height, width, size, images.device)
    out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    if images.dtype != torch.uint8:
        return out
    # a convex combination of values in [0, 255] can overshoot by an ulp; keep the promise of [0, 1]
    return out.div_(255.0).clamp_(0.0, 1.0)


def view_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator for the views of one step, seeded from the pair ``(seed, step)``.

    ``np.random.SeedSequence`` hashes the pair, so distinct pairs get unrelated streams —
    unlike ``seed + step``, where (1, 0) and (0, 1) draw the same views.
    """
    if seed < 0 or step < 0:
        raise ValueError(f"seed and step must be non-negative, got seed={seed}, step={step}")
    state = words_for(seed, step, count=1)[0]
    # manual_seed takes any integer below 2**64
    return torch.Generator(device="cpu").manual_seed(int(state))


class DeviceAugment:
    """Training augmentation on the images' device: draws a step's views, then applies them."""

    def __init__(self, spec: AugmentSpec, seed: int) -> None:
        if seed < 0:
            raise ConfigError(f"augment seed must be non-negative, got {seed}")
        self.spec = spec
        self.seed = int(seed)

    def __call__(self, images: Tensor, *, step: int) -> tuple[Tensor, Tensor]:
        """The float batch ``[B, C, size, size]`` (see ``apply_views``), and its views ``[B, 5]`` (CPU) for replay."""
        if images.dim() != 4:
            raise TypeError(f"images must be [B, C, H, W], got {images.dtype} {list(images.shape)}")
        batch, _, height, width = images.shape
        views = draw_views(batch, height, width, self.spec, view_generator(self.seed, step))
        return apply_views(images, views, self.spec.size), views
