"""How a cache's images and labels become the networks' input and the loss's targets, checked before training.

The fields are the user's: ``data.image_field`` and ``data.label_field`` name them, and the
images may be uint8, uint16, float16, bfloat16, float32 or float64, channels first (CHW),
last (HWC) or absent (HW, grayscale). Everything that can be known from the manifest is
checked when a run is built, before its first step, and each mismatch is one line naming
the key to change; labels are checked against ``model.num_classes`` from the value range
the manifest records per label file.

On the device, ``ImageFormat.images`` turns a loader batch into ``[B, C, H, W]`` without a
copy where it can (a permuted view for HWC, bfloat16 bits viewed in place, gray expanded);
uint8 stays uint8, which ``apply_views`` scales itself exactly as it always has, and other
dtypes become values in the networks' range (``[0, 1]``, or as stored when normalised).
Augmentation and the replay of cached teacher views then run the same code on any cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from shardstore.config.data import DataConfig
from shardstore.config.model import NetworkConfig
from shardstore.errors import ConfigError, CorruptShardError
from shardstore.kd.losses import UNLABELED
from shardstore.store.reader import ShardStore

#: dtypes read as they are (bfloat16 comes as 16-bit integers or ml_dtypes' ``V2``)
PLAIN_DTYPES = ("uint8", "uint16", "float16", "float32", "float64")
#: the stored value of white when ``data.image_scale`` is null
DEFAULT_SCALE = {"uint8": 255.0, "uint16": 65535.0}
#: channel counts that tell the channel axis of a 3-d image
CHANNEL_COUNTS = (1, 3, 4)
#: rows of the first training shard whose values are checked against the scale
CHECKED_ROWS = 16
#: which data key sets each of ``ImageFormat.settings()``
SETTING_KEYS = {"layout": "image_layout", "dtype": "image_dtype", "scale": "image_scale",
                "normalized": "image_normalized", "repeat_gray": "repeat_gray"}


@dataclass(frozen=True)
class ImageFormat:
    """Where a cache's images and labels are and how their values are read; the defaults are shardstore's own."""

    image_field: str = "images"
    label_field: str = "labels"
    #: ``CHW``, ``HWC``, or ``HW`` (one channel, no channel axis)
    layout: str = "CHW"
    #: how the values are read: one of ``PLAIN_DTYPES`` or ``bfloat16``
    dtype: str = "uint8"
    #: the stored value of white: images are divided by it (1 for normalised images)
    scale: float = 255.0
    #: stored already normalised with a mean and std (the networks then skip theirs)
    normalized: bool = False
    #: one stored channel repeated to three
    repeat_gray: bool = False
    #: ``(C, H, W)`` as stored; None for a format not read from a cache
    shape: tuple[int, int, int] | None = None
    #: labels outside ``[0, num_classes)`` and -1 are refused when a batch is read (0: not checked)
    num_classes: int = 0
    #: on a GPU: whether a batch held such labels (one device flag, read by ``check_seen_labels``)
    _bad_labels: list[Tensor] = field(default_factory=list, compare=False, repr=False)

    @property
    def channels(self) -> int:
        """Channels the networks get (after ``repeat_gray``)."""
        assert self.shape is not None
        return 3 if self.repeat_gray else self.shape[0]

    def settings(self) -> dict[str, Any]:
        """What decides the pixels a network sees (cached teacher targets record it): not the fields or the size."""
        return {k: getattr(self, k) for k in SETTING_KEYS}

    def images(self, raw: Tensor) -> Tensor:
        """A loader batch of the image field -> ``[B, C, H, W]`` for ``apply_views``: uint8 as is, else float values.

        Never writes into ``raw`` (the loader reuses its buffers).
        """
        x = raw
        if self.dtype == "bfloat16" and x.dtype != torch.bfloat16:
            x = x.view(torch.bfloat16)  # 16-bit integers holding bfloat16 bit patterns
        if self.layout == "HWC":
            x = x.permute(0, 3, 1, 2)
        elif self.layout == "HW":
            x = x.unsqueeze(1)
        if x.dtype == torch.uint8 and self.scale == 255.0:
            pass  # apply_views divides by 255 after interpolating: the same bits as every uint8 run before
        elif not x.is_floating_point() or x.dtype == torch.float64:
            x = x.float() / self.scale if self.scale != 1.0 else x.float()
        elif self.scale != 1.0:
            x = x.float() / self.scale
        if self.repeat_gray:
            x = x.expand(-1, 3, -1, -1)
        return x

    def labels(self, raw: Tensor) -> Tensor:
        """A loader batch of the label field -> int64 ``[B]``, checked against ``num_classes`` when it is set.

        The manifest's recorded label range is checked before the first step, but a label file
        rewritten in place or a hand-edited manifest.json can still bring a label the loss would
        index out of bounds (a raw ``IndexError`` on a CPU, a device-side assert that kills a GPU
        process). On a CPU the batch is checked at once (no device to wait for); on a GPU such
        labels become -1 (unlabeled) and a flag, read where the trainer reads the device anyway
        (``check_seen_labels``), so the step never waits.
        """
        y = raw.reshape(-1).long()
        if not self.num_classes or y.numel() == 0:
            return y
        bad = (y < UNLABELED) | (y >= self.num_classes)
        if y.device.type == "cpu":
            if bool(bad.any()):
                raise self._label_error(int(y[bad][0]))
            return y
        return self._mask_labels(y, bad)

    def _mask_labels(self, y: Tensor, bad: Tensor) -> Tensor:
        """The GPU path of ``labels``: ``bad`` labels become -1 and the flag remembers them, without a sync."""
        seen = bad.any()
        self._bad_labels[:] = [seen if not self._bad_labels else self._bad_labels[0] | seen]
        return y.masked_fill(bad, UNLABELED)

    def check_seen_labels(self) -> None:
        """``CorruptShardError`` if a GPU batch held a label outside the classes since the format was made (syncs)."""
        if self._bad_labels and bool(self._bad_labels[0]):
            raise self._label_error(None)

    def _label_error(self, value: int | None) -> CorruptShardError:
        what = f"holds the label {value}" if value is not None else "held a label"
        return CorruptShardError(
            f"a batch of the field {self.label_field!r} {what} outside 0..{self.num_classes - 1} (or -1: "
            "unlabeled), though manifest.json records every label file in range: a label file changed after the "
            "manifest was built, or manifest.json was edited; rebuild it with shardstore build-manifest --full "
            "on data.cache_root (training then names the shard before its first step)")


def _describe(store: ShardStore, field: str) -> str:
    return f"{field!r} ({store.fields[field].describe()})"


def _field(store: ShardStore, name: str, key: str, what: str) -> None:
    if name not in store.fields:
        raise ConfigError(f"the cache {store.root} has no field {name!r} (it has {', '.join(sorted(store.fields))}); "
                          f"set data.{key} to the field that holds the {what}")


def _layout(data: DataConfig, store: ShardStore, shape: tuple[int, ...]) -> str:
    field = _describe(store, data.image_field)
    if len(shape) == 2:
        return "HW"
    if len(shape) != 3:
        raise ConfigError(f"the images {field} are not [C, H, W], [H, W, C] or [H, W] per sample; write them in one "
                          "of those shapes, or set data.image_field to the field that holds the images")
    if data.image_layout is not None:
        return data.image_layout
    first, last = shape[0] in CHANNEL_COUNTS, shape[2] in CHANNEL_COUNTS
    if first != last:
        return "CHW" if first else "HWC"
    raise ConfigError(f"cannot tell which axis of the images {field} holds the channels; set data.image_layout: CHW "
                      "(channels first) or HWC (channels last)")


def _dtype(data: DataConfig, store: ShardStore) -> tuple[str, ShardStore]:
    """How the image values are read, and the store that reads them (bfloat16 saved as ``V2`` is read as uint16)."""
    spec = store.fields[data.image_field]
    field = _describe(store, data.image_field)
    if not spec.dtype.isnative:
        raise ConfigError(f"the images {field} are stored big-endian; write them in native byte order "
                          "(arr.astype(arr.dtype.newbyteorder('=')))")
    if data.image_dtype == "bfloat16":
        if spec.dtype.itemsize != 2 or spec.dtype.kind not in "iuV":
            raise ConfigError(f"data.image_dtype: bfloat16 reads 16-bit integer files as bfloat16 bits, but the "
                              f"images {field} are not; remove image_dtype")
    elif spec.dtype.kind == "V" and spec.dtype.itemsize == 2:
        pass  # ml_dtypes saves bfloat16 as V2: NumPy has no bfloat16 of its own
    elif spec.dtype.name in PLAIN_DTYPES:
        return spec.dtype.name, store
    elif spec.dtype == np.int16:
        raise ConfigError(f"the images {field} are 16-bit integers: if they hold bfloat16 bits, set data.image_dtype: "
                          "bfloat16; else write them as uint8, uint16, float16 or float32")
    else:
        raise ConfigError(f"the images {field} have a dtype shardstore does not read; write them as uint8, uint16, "
                          "float16, bfloat16 or float32 (or set data.image_field to the field that holds the images)")
    return "bfloat16", store.with_dtype(data.image_field, np.dtype(np.uint16)) if spec.dtype.kind == "V" else store


def image_format(data: DataConfig, store: ShardStore, *, labels: bool = True) -> tuple[ImageFormat, ShardStore]:
    """The format of ``store``'s images and labels under ``data``, and the store to read them through.

    Checks, from the manifest alone: both fields exist; the images have a readable dtype and
    shape and an unambiguous channel axis; the scale, normalisation and gray settings fit
    them; the labels are integers, one per sample (unless ``labels`` is False: caching
    teacher outputs reads no labels). ``ConfigError`` naming the key otherwise.
    """
    _field(store, data.image_field, "image_field", "images")
    if labels:
        _field(store, data.label_field, "label_field", "class labels")
    dtype, store = _dtype(data, store)
    shape = tuple(store.fields[data.image_field].shape)
    layout = _layout(data, store, shape)
    chw = (1, *shape) if layout == "HW" else shape if layout == "CHW" else (shape[2], shape[0], shape[1])
    field = _describe(store, data.image_field)
    integer = dtype in DEFAULT_SCALE
    if data.image_normalized and integer:
        raise ConfigError(f"data.image_normalized is true, but the images {field} are integers; normalised images "
                          "are floats: remove image_normalized, or set data.image_field to the normalised images")
    if data.repeat_gray and chw[0] != 1:
        raise ConfigError(f"data.repeat_gray is true, but the images {field} have {chw[0]} channels ({layout}); "
                          "remove repeat_gray" + ("" if data.image_layout else ", or set data.image_layout"))
    label = store.fields[data.label_field] if labels else None
    if label is not None and label.dtype.kind not in "iu":
        raise ConfigError(f"the labels {_describe(store, data.label_field)} are not integers; labels are class "
                          "indices: write them as integers (e.g. int64), or set data.label_field to the class labels")
    if label is not None and tuple(label.shape) not in ((), (1,)):
        raise ConfigError(f"the labels {_describe(store, data.label_field)} are not one integer per sample (one-hot "
                          "or soft labels are not read); write class indices, or set data.label_field to them")
    scale = 1.0 if data.image_normalized else data.image_scale or DEFAULT_SCALE.get(dtype, 1.0)
    fmt = ImageFormat(image_field=data.image_field, label_field=data.label_field, layout=layout, dtype=dtype,
                      scale=float(scale), normalized=data.image_normalized, repeat_gray=data.repeat_gray,
                      shape=(int(chw[0]), int(chw[1]), int(chw[2])))
    return fmt, store


def network_channels(net: NetworkConfig, role: str, data: DataConfig) -> int:
    """Input channels of the teacher or student (``role``): ``kwargs.in_chans``, else one per ``input.mean`` value."""
    in_chans = net.kwargs.get("in_chans")
    if in_chans is None:
        return len(net.input.mean)
    if isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans < 1:
        raise ConfigError(f"model_config: {role}.kwargs.in_chans must be a positive integer, got {in_chans!r}")
    if not data.image_normalized and in_chans != len(net.input.mean):
        raise ConfigError(f"model_config: {role}.kwargs.in_chans is {in_chans}, but {role}.input.mean and std have "
                          f"{len(net.input.mean)} values; give them one value per input channel")
    return in_chans


def network_inputs(net: NetworkConfig, role: str, data: DataConfig) -> dict[str, Any]:
    """``build_model`` keyword arguments (``in_chans`` included) and the ``InputAdapter``'s ``mean`` and ``std``.

    Normalised images are used as stored: the adapter's mean is 0 and its std 1 (the
    network's own ``input.mean`` and ``std`` are skipped).
    """
    channels = network_channels(net, role, data)
    kwargs = {k: v for k, v in net.kwargs.items() if k != "in_chans"} | {"in_chans": channels}
    if data.image_normalized:
        return {"kwargs": kwargs, "mean": (0.0,) * channels, "std": (1.0,) * channels}
    return {"kwargs": kwargs, "mean": tuple(net.input.mean), "std": tuple(net.input.std)}


def check_channels(fmt: ImageFormat, net: NetworkConfig, role: str, data: DataConfig) -> None:
    """The network ``role`` takes as many channels as the images give it; else one line with the keys to change."""
    takes = network_channels(net, role, data)
    assert fmt.shape is not None
    if takes == fmt.channels:
        return
    what = f"the images {fmt.image_field!r} ({fmt.layout} {list(fmt.shape)})"
    if fmt.shape[0] == 1 and takes == 3:
        raise ConfigError(f"{what} have 1 channel (grayscale) and model.{role} takes 3; set data.repeat_gray: true, "
                          f"or make it a 1-channel network (model.{role}.input.mean and std with one value each)")
    given = f"{fmt.channels} channels" + (" (data.repeat_gray)" if fmt.repeat_gray else "")
    if fmt.layout != "HW" and data.image_layout and fmt.channels > 4:  # an axis no image has: the layout is wrong
        other = "HWC" if fmt.layout == "CHW" else "CHW"
        raise ConfigError(f"{what} give {given} and model.{role} takes {takes}: data.image_layout is "
                          f"{data.image_layout}, which reads the wrong axis as channels; set data.image_layout: "
                          f"{other} (or null to detect it)")
    fix = "" if fmt.layout == "HW" or data.image_layout else ", or set data.image_layout if that is the wrong axis"
    raise ConfigError(f"{what} give {given} and model.{role} takes {takes}; give model.{role}.input.mean and std "
                      f"one value per channel{fix}")


def check_labels(store: ShardStore, fmt: ImageFormat, num_classes: int) -> None:
    """Every label of ``store`` is in ``[0, num_classes)`` or -1 (unlabeled: only the KD term learns from it).

    From the ranges the manifest records per label file; a file without one is read.
    """
    m = store.manifest
    counts = np.asarray(store.counts)
    if f"{fmt.label_field}.min" in m.columns:
        low_col = np.asarray(m.columns[f"{fmt.label_field}.min"]).copy()
        high_col = np.asarray(m.columns[f"{fmt.label_field}.max"]).copy()
    else:
        low_col = np.ones(store.num_shards, np.int64)
        high_col = np.zeros(store.num_shards, np.int64)
    # A manifest built before ranges were recorded, or a label file too large to record: read those files.
    for position in np.flatnonzero((low_col > high_col) & (counts > 0)).tolist():
        values = store.read(position, fmt.label_field)
        low_col[position], high_col[position] = int(values.min()), int(values.max())
    used = np.flatnonzero(counts > 0)
    if not used.size:
        return
    low_p = int(used[np.argmin(low_col[used])])
    high_p = int(used[np.argmax(high_col[used])])
    low, low_at = int(low_col[low_p]), int(store.shard_ids[low_p])
    high, high_at = int(high_col[high_p]), int(store.shard_ids[high_p])
    where = f"the labels {fmt.label_field!r} in {store.root}"
    if low < UNLABELED:
        raise ConfigError(f"{where} include {low} (shard {low_at}); labels are class indices from 0 to "
                          f"model.num_classes - 1 (or -1: unlabeled): write them from 0, or set data.label_field to "
                          "the class labels")
    if high >= num_classes:
        raise ConfigError(f"{where} go up to {high} (shard {high_at}), but model.num_classes is {num_classes}; set "
                          f"model.num_classes to at least {high + 1}, or set data.label_field to the class labels")


def check_values(store: ShardStore, fmt: ImageFormat) -> None:
    """The first ``CHECKED_ROWS`` images of ``store`` are finite and, unless normalised, in [0, 1] once scaled.

    A float cache of 0-255 values read with the default scale 1 (or normalised values read
    as pixels) would otherwise train on clamped or shifted inputs without a word.
    """
    if fmt.dtype in DEFAULT_SCALE and fmt.scale == DEFAULT_SCALE[fmt.dtype] or not store.num_shards:
        return  # integers at their full range cannot leave [0, 1]
    rows = min(CHECKED_ROWS, int(store.counts[0]))
    if rows == 0:
        return
    x = fmt.images(torch.from_numpy(store.read(0, fmt.image_field, slice(0, rows)))).float()
    where = f"the images {fmt.image_field!r} (first {rows} of shard {int(store.shard_ids[0])})"
    if not bool(torch.isfinite(x).all()):
        raise ConfigError(f"{where} hold NaN or infinite values; write finite values (or set data.image_field)")
    if fmt.normalized:
        return
    low, high = float(x.min()), float(x.max())
    if low < -0.01:  # first: normalised images also tend to exceed 1
        raise ConfigError(f"{where} go down to {low * fmt.scale:g}; pixel values are not negative: set "
                          "data.image_normalized: true if they are mean/std normalised")
    if high > 1.01:
        raise ConfigError(f"{where} reach {high * fmt.scale:g}, above data.image_scale {fmt.scale:g} (the stored value "
                          "of white); set data.image_scale to the stored range (e.g. 255), or data.image_normalized: "
                          "true if they are mean/std normalised")
