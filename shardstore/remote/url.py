"""Object-store URLs (``s3://bucket/prefix``, ``gs://``, ``az://``, ``file:///abs/path``) and sizes (``"50GB"``).

A root is remote when it is a string with one of ``REMOTE_SCHEMES`` and ``://``; anything else (a plain
path, a ``Path``) is a local directory. Keys below a root are joined with ``/`` whatever the platform.
"""

from __future__ import annotations

import os
import re

from shardstore.errors import ConfigError, ShardstoreError

REMOTE_SCHEMES = ("s3", "gs", "az", "file")

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$", re.DOTALL)
# The characters every store allows in a bucket (S3, GCS) or container (Azure) name; each store is stricter
# still, and says so itself on the first request.
_BUCKET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def is_remote(root: object) -> bool:
    """True for a string ``<scheme>://...`` with a scheme of ``REMOTE_SCHEMES`` (any case); False for paths.

    ``Path("s3://bucket")`` is not remote: ``pathlib`` has already folded it into ``s3:/bucket``.
    """
    if not isinstance(root, str):
        return False
    match = _URL.match(root)
    return match is not None and match.group(1).lower() in REMOTE_SCHEMES


def _supported() -> str:
    return ", ".join(f"{scheme}://" for scheme in REMOTE_SCHEMES)


def split_url(url: str) -> tuple[str, str, str]:
    """``(scheme, bucket, prefix)`` of a root URL; ``file://`` gives ``("file", "", absolute path)``.

    The prefix has no leading or trailing ``/`` (``""`` for a whole bucket). A URL with no bucket, an unknown
    scheme, a relative ``file://`` path or a ``..`` segment is a one-line ``ShardstoreError`` naming the fix.
    """
    if isinstance(url, os.PathLike) or not isinstance(url, str):
        raise ShardstoreError(f"{url!r} is not an object-store URL; write it as a string such as "
                              f"'s3://bucket/prefix' ({_supported()})")
    match = _URL.match(url)
    if match is None:
        raise ShardstoreError(f"{url!r} is not an object-store URL; write <scheme>://<bucket>/<prefix> "
                              f"with one of {_supported()}")
    scheme, rest = match.group(1).lower(), match.group(2)
    if scheme not in REMOTE_SCHEMES:
        raise ShardstoreError(f"unsupported URL scheme {scheme + '://'!r} in {url!r}; the supported schemes "
                              f"are {_supported()} (for a local directory, give its path without a scheme)")
    if any(c.isspace() and c != " " for c in rest) or "\x00" in rest:
        raise ShardstoreError(f"{url!r} contains a control character; remove it")
    if scheme == "file":
        path = rest[len("localhost"):] if rest.startswith("localhost/") else rest
        if not path.startswith("/"):
            raise ShardstoreError(f"{url!r}: a file:// URL takes an absolute path, three slashes in all: "
                                  f"'file:///data/cache'")
        _check_segments(url, path.strip("/"))
        return "file", "", "/" + path.strip("/")
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ShardstoreError(f"{url!r} names no bucket; write {scheme}://<bucket>/<prefix>, "
                              f"e.g. '{scheme}://my-bucket/caches/imagenet'")
    if not _BUCKET.match(bucket):
        raise ShardstoreError(f"{bucket!r} in {url!r} is not a valid bucket name; bucket names use only "
                              f"letters, digits, '.', '-' and '_'")
    prefix = prefix.strip("/")
    _check_segments(url, prefix)
    return scheme, bucket, prefix


def _check_segments(url: str, path: str) -> None:
    parts = path.split("/") if path else []
    if any(part in (".", "..") for part in parts):
        raise ShardstoreError(f"{url!r} contains a '.' or '..' segment; give the prefix without them")
    if any(part == "" for part in parts):
        raise ShardstoreError(f"{url!r} contains an empty segment ('//'); remove the extra '/'")


def join_key(prefix: str, key: str) -> str:
    """``prefix/key`` with exactly one ``/`` between them; either may be empty."""
    prefix, key = prefix.strip("/"), key.lstrip("/")
    if not prefix:
        return key
    if not key:
        return prefix
    return f"{prefix}/{key}"


_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")
_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE_FORMS = ("a whole number of bytes (4096), or a number and a unit: B, KB, MB, GB, TB (powers of 1000) "
               "or KiB, MiB, GiB, TiB (powers of 1024), e.g. '50GB', '512MiB', '1.5 GB'")


def parse_size(value: int | str, *, name: str = "size") -> int:
    """Bytes in ``value``: an int >= 1, or a string like ``"50GB"``, ``"512MiB"``, ``"1.5 GB"``, ``"4096"``.

    Units are case-insensitive; KB/MB/GB/TB are decimal, KiB/MiB/GiB/TiB binary. A fractional number of bytes
    (``"1.5B"``), zero, a negative number or an unknown unit (``"50G"``) is a ``ConfigError`` that names
    ``name`` and lists the accepted forms.
    """
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be {_SIZE_FORMS}; got {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise ConfigError(f"{name} must be at least 1 byte; got {value}")
        return value
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be {_SIZE_FORMS}; got {value!r}")
    match = _SIZE.match(value)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ConfigError(f"{name} {value!r} is not a size; use {_SIZE_FORMS}")
    number, scale = match.group(1), _UNITS[unit]
    whole, _, fraction = number.partition(".")
    fraction = fraction.rstrip("0")
    # Exact arithmetic: "1.1TB" is 1,100,000,000,000 bytes, not what a float makes of it.
    numerator = int(whole or "0") * 10 ** len(fraction) + int(fraction or "0")
    total, remainder = divmod(numerator * scale, 10 ** len(fraction))
    if remainder:
        raise ConfigError(f"{name} {value!r} is not a whole number of bytes; use {_SIZE_FORMS}")
    if total < 1:
        raise ConfigError(f"{name} must be at least 1 byte; got {value!r}")
    return total
