"""``--set SECTION.KEY=VALUE`` overrides applied to the three config mappings before they are validated."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

import yaml

from shardstore.config.schema import Problems, YAMLAliasError, parse_yaml, yaml_problem
from shardstore.errors import ConfigError

SECTIONS = ("data", "train", "model")
"""The first part of an override names the file it changes."""

_FORM = "expected SECTION.KEY=VALUE with SECTION one of data, train, model (e.g. --set train.loss.alpha=0.9)"


def apply_overrides(sections: dict[str, dict[str, Any]], overrides: Iterable[str]) -> None:
    """Set each ``section.key[.subkey...]=value`` in ``sections`` in place; the value is read as YAML (no aliases).

    Missing intermediate mappings are created; key names are checked later, when the sections are validated.
    Every malformed override is reported in one ``ConfigError`` (one line each); the others are applied.
    """
    if isinstance(overrides, str):
        raise TypeError("overrides must be a list of strings, not one string")
    problems = Problems()
    for item in overrides:
        problems.attempt(lambda: _apply_one(sections, item))
    problems.raise_any()


def _apply_one(sections: dict[str, dict[str, Any]], item: str) -> None:
    """Set one ``section.key[.subkey...]=value``; ``ConfigError`` naming the override when it cannot be."""
    key, sep, text = item.partition("=")
    parts = [p.strip() for p in key.split(".")]
    if not sep or len(parts) < 2 or not all(parts):
        raise ConfigError(f"--set `{item}`: {_FORM}")
    if parts[0] not in SECTIONS:
        close = difflib.get_close_matches(parts[0], SECTIONS, n=1)
        hint = f"; did you mean `{close[0]}`?" if close else ""
        raise ConfigError(f"--set `{item}`: unknown section `{parts[0]}`; the first part names the config file: "
                          f"{', '.join(SECTIONS)}{hint}")
    try:
        value = parse_yaml(text)
    except YAMLAliasError as exc:
        raise ConfigError(f"--set `{item}`: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set `{item}`: the value is {yaml_problem(exc)}; quote it or close its brackets"
                          ) from None
    node = sections.setdefault(parts[0], {})
    for depth, part in enumerate(parts[1:-1], start=2):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            where = ".".join(parts[1:depth])
            raise ConfigError(f"--set `{item}`: `{where}` in the {parts[0]} config is {child!r}, not a section "
                              f"of keys; set `{parts[0]}.{where}` itself")
        node = child
    node[parts[-1]] = value
