"""Checks of ``data_config.yaml`` values that span several keys: the object-storage and the image/label settings."""

from __future__ import annotations

import math
from typing import Any


def remote_problems(values: dict[str, Any]) -> list[str]:
    """What is wrong with the object-storage settings (each a line without the source)."""
    from shardstore.remote.url import REMOTE_SCHEMES, is_remote, parse_size

    root = str(values.get("cache_root", ""))
    out = []
    if is_remote(root):
        if values.get("local_cache") is None:
            out.append(f"`cache_root` is {root}, in object storage: set `local_cache` to a node-local directory the "
                       "shards an epoch needs are copied into")
        if values.get("cache_limit") is None:
            out.append("`cache_limit` is missing: set the most `local_cache` may hold (e.g. 50GB)")
    elif "://" in root:
        out.append(f"`cache_root` {root!r} is a URL of a kind this project cannot read; use a local directory or "
                   f"one of {', '.join(s + '://' for s in REMOTE_SCHEMES)}")
    if values.get("cache_limit") is not None:
        try:
            values["cache_limit"] = parse_size(values["cache_limit"])
        except Exception as exc:  # ConfigError or ShardstoreError: one line naming the forms
            out.append(f"`cache_limit`: {exc}")
    return out


def field_problems(values: dict[str, Any]) -> list[str]:
    """What is wrong with the image and label settings (each a line without the source)."""
    out = []
    if values.get("image_field", "images") == values.get("label_field", "labels"):
        out.append(f"`image_field` and `label_field` are both {values.get('label_field', 'labels')!r}; "
                   "name the image field and the label field")
    scale = values.get("image_scale")
    if scale is not None and not (math.isfinite(scale) and scale > 0):
        out.append(f"`image_scale` must be a positive number (the stored value of white, e.g. 255 or 1), got {scale}")
    if scale is not None and values.get("image_normalized"):
        out.append("`image_scale` and `image_normalized: true` are both set: normalised images are used as stored; "
                   "remove image_scale")
    return out
