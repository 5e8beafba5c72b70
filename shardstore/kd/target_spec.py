"""The settings of a teacher-target group (``ROOT/<name>.fields.json``'s meta) and the views it was drawn with.

See ``shardstore.kd.teacher_cache`` for the fields and how they are written.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from shardstore.errors import ConfigError
from shardstore.kd.augment import AugmentSpec, draw_views, view_generator
from shardstore.kd.targets import index_dtype
from shardstore.sampling.seeds import CACHED_VIEWS, derive_seed
from shardstore.store.groups import GroupSpec, check_group_name, group_file, read_group_specs

META_FORMAT = "shardstore-teacher-targets"
#: settings that must match for a run to add shards to an existing group
SAME_SETTINGS = ("views", "logits", "topk", "num_classes", "embedding_dim", "seed", "augment", "image_field",
                 "image_shape", "image_format", "teacher")
#: how targets written before image formats were recorded read their images (shardstore's own uint8 CHW)
LEGACY_IMAGE_FORMAT = {"layout": "CHW", "dtype": "uint8", "scale": 255.0, "normalized": False, "repeat_gray": False}


@dataclass(frozen=True)
class TargetSpec:
    """What a teacher-target group holds and how its views were drawn (the group declaration's ``meta``)."""

    name: str
    views: int
    logits: str  # "topk", "dense" or "none"
    topk: int
    num_classes: int
    embedding_dim: int  # 0: no embeddings
    seed: int
    augment: dict[str, Any]  # random_resized_crop, scale, ratio, flip
    image_field: str
    image_shape: tuple[int, int, int]  # C, H, W of the cached images
    teacher: dict[str, Any]  # which teacher, how it ran (see teacher_cache.teacher_identity)
    #: how the images' values were read (``ImageFormat.settings()``): the replay must read them the same way
    image_format: dict[str, Any] = field(default_factory=lambda: dict(LEGACY_IMAGE_FORMAT))

    # -- fields ----------------------------------------------------------------------------

    def field_names(self) -> dict[str, str]:
        """Role (``views``, ``index``, ``logp``, ``tail``, ``logits``, ``embedding``) to field name."""
        roles = ["views"]
        roles += ["index", "logp", "tail"] if self.logits == "topk" else ["logits"] if self.logits == "dense" else []
        roles += ["embedding"] if self.embedding_dim else []
        suffix = {"views": "views", "index": "topk_index", "logp": "topk_logp", "tail": "tail_logp",
                  "logits": "logits", "embedding": "embedding"}
        return {role: f"{self.name}_{suffix[role]}" for role in roles}

    def field_specs(self) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        k, v = self.topk, self.views
        _, height, width = self.image_shape
        view_dtype = np.int16 if max(height, width) <= np.iinfo(np.int16).max else np.int32
        shapes: dict[str, tuple[Any, tuple[int, ...]]] = {
            "views": (view_dtype, (v, 5)),
            "index": (torch.empty(0, dtype=index_dtype(self.num_classes)).numpy().dtype, (v, k)),
            "logp": (np.float16, (v, k)), "tail": (np.float16, (v,)),
            "logits": (np.float16, (v, self.num_classes)), "embedding": (np.float16, (v, self.embedding_dim)),
        }
        return {name: (np.dtype(shapes[role][0]), shapes[role][1]) for role, name in self.field_names().items()}

    def augment_spec(self, size: int) -> AugmentSpec:
        a = self.augment
        return AugmentSpec(size=size, random_resized_crop=bool(a["random_resized_crop"]), scale=tuple(a["scale"]),
                           ratio=tuple(a["ratio"]), flip=bool(a["flip"]))

    def bytes_per_sample(self) -> int:
        return sum(math.prod(shape) * dtype.itemsize for dtype, shape in self.field_specs().values())

    # -- the declaration -------------------------------------------------------------------

    def to_group(self) -> GroupSpec:
        meta = {"format": META_FORMAT, **asdict(self)}
        meta["image_shape"] = list(self.image_shape)
        return GroupSpec(self.name, self.field_specs(), meta)

    @classmethod
    def from_group(cls, group: GroupSpec, source: str) -> TargetSpec:
        meta = dict(group.meta)
        if meta.pop("format", None) != META_FORMAT:
            raise ConfigError(f"{source}: group {group.name!r} does not hold teacher targets; "
                              "name a group written by `shardstore cache-teacher`")
        try:
            meta["image_shape"] = tuple(int(d) for d in meta["image_shape"])
            if not isinstance(meta.get("image_format", {}), dict):
                raise TypeError("image_format is not a mapping")
            spec = cls(**meta)
        except (TypeError, ValueError, KeyError) as exc:
            raise ConfigError(f"{source}: malformed teacher-target settings ({exc}); "
                              "run `shardstore cache-teacher` again with a new --name") from None
        if spec.field_specs() != group.fields:
            raise ConfigError(f"{source}: the fields do not match the teacher-target settings; "
                              "run `shardstore cache-teacher` again with a new --name")
        return spec


def read_target_spec(root: str | Path, name: str) -> TargetSpec:
    """The teacher-target group ``name`` of the cache at ``root``; ``ConfigError`` with the fix if there is none."""
    check_group_name(name)  # a name from a config or the command line: an identifier, never a path
    groups = read_group_specs(root)
    if name not in groups:
        have = ", ".join(sorted(groups)) or "none"
        raise ConfigError(f"the cache {root} has no teacher targets named {name!r} (groups: {have}); "
                          f"write them with `shardstore cache-teacher --name {name}`")
    return TargetSpec.from_group(groups[name], str(group_file(root, name)))


def _views_seed(seed: int) -> int:
    return derive_seed(seed, stream=CACHED_VIEWS)


def shard_views(spec: TargetSpec, shard_id: int, num_samples: int) -> Tensor:
    """The ``[num_samples, K, 5]`` views of a shard: drawn from ``(seed, shard id)`` alone, in any order of work."""
    _, height, width = spec.image_shape
    views = draw_views(num_samples * spec.views, height, width, spec.augment_spec(1),
                       view_generator(_views_seed(spec.seed), shard_id))
    return views.view(num_samples, spec.views, 5)
