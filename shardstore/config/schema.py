"""A typed loader for frozen keyword-only config dataclasses: keys, types and values checked, errors in one line."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import re
import types
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml
from yaml.events import AliasEvent

from shardstore.errors import ConfigError

T = TypeVar("T")

# PyYAML (YAML 1.1) reads `3e-4` and `1.0e3` as strings; a float key takes such a string as the number it spells.
_NUMBER_TEXT = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
# Words YAML 1.1 reads as booleans: `amp: off` is False unless quoted.
_YAML_BOOL_WORDS = {True: ("on", "yes", "true"), False: ("off", "no", "false")}
# A key written in backticks in a validation message, as `alpha` or `eval.cache_root`.
_QUOTED_KEY = re.compile(r"`([A-Za-z_]\w*)((?:\.\w+)*)`")
# The range of a signed 64-bit integer: what NumPy, torch and the on-disk tables can hold.
INT_MIN, INT_MAX = -(2**63), 2**63 - 1
# While ``from_mapping`` builds a dataclass, ``__post_init__``'s checks (``at_least``, ...) note their problems here
# and let the others run, so one run reports every bad value of a file; outside it they raise at once.
_POST_INIT_PROBLEMS: ContextVar[list[str] | None] = ContextVar("_POST_INIT_PROBLEMS", default=None)


class YAMLAliasError(yaml.YAMLError):
    """An anchor (``&name``) or alias (``*name``) in a config: refused, as nested aliases expand without bound."""

    def __init__(self, line: int) -> None:
        super().__init__(f"YAML anchors and aliases (&name, *name) are not supported (line {line}); "
                         "write each value out in full")


class _NoAliasLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that stops at the first anchor or alias, before anything is expanded.

    A few hundred bytes of nested aliases (a "billion laughs") expand to gigabytes once constructed,
    and a recursive alias never ends; configs have no need for either.
    """

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, AliasEvent) or getattr(event, "anchor", None) is not None:
            raise YAMLAliasError(event.start_mark.line + 1)
        return super().compose_node(parent, index)


def parse_yaml(text: str) -> Any:
    """``text`` read like ``yaml.safe_load``, except that anchors and aliases raise ``YAMLAliasError``.

    A value that cannot be constructed (an integer of thousands of digits, a date like 2024-13-01) is a
    ``yaml.YAMLError`` too, so every problem with the text reaches the caller as one kind of error.
    """
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except ValueError as exc:
        if "integer string conversion" in str(exc):
            raise yaml.YAMLError("an integer has thousands of digits; no setting needs one") from None
        raise yaml.YAMLError(f"a value cannot be read: {exc}") from None


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error as text for one line: the alias rule as is, a parser's error in brackets."""
    if isinstance(exc, YAMLAliasError):
        return str(exc)
    return f"not valid YAML ({' '.join(str(exc).split())})"


def load_yaml(path: str | os.PathLike[str], *, option: str = "--config") -> dict[str, Any]:
    """Read a YAML mapping with ``parse_yaml`` (an empty file is ``{}``); ``option`` is the flag in the fix."""
    path = Path(path)
    try:
        values = parse_yaml(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file; pass {option} PATH") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid YAML (not UTF-8 text)") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror or exc}); pass {option} PATH") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: {yaml_problem(exc)}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values, got {type(values).__name__}")
    return values


class Problems:
    """Problems found while checking a config, gathered so that all of them are reported in one ``ConfigError``."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def attempt(self, make: Callable[[], T]) -> T | None:
        """``make()``, or None with its ``ConfigError``'s problems noted."""
        try:
            return make()
        except ConfigError as exc:
            self.lines.extend(exc.problems)
            return None

    def add(self, line: str) -> None:
        self.lines.append(line)

    def raise_any(self) -> None:
        """``ConfigError`` listing every problem noted, one line each; nothing when there is none."""
        if self.lines:
            raise ConfigError(*dict.fromkeys(self.lines))  # each once, in the order found


def from_mapping(cls: type[T], values: dict[str, Any], source: str, *, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a YAML mapping; every problem is a one-line ``ConfigError`` naming ``source``.

    ``prefix`` (``"loss."``) is put before key names in messages; nested dataclass fields are loaded with it.
    A ``ValueError`` from ``__post_init__`` comes back as ``ConfigError`` with the source and prefixed key names.
    The mapping is checked whole: unknown keys, wrong types, missing keys and the bad values ``__post_init__``
    finds all come in one ``ConfigError``, one line each. A key whose value is wrong is checked by
    ``__post_init__`` with its default in its place, and what that check says about it is left out.
    """
    problems = Problems()
    kwargs, failed = _checked_fields(cls, values, source, prefix, problems)
    for f in _init_fields(cls):
        if f.name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            fix = f.metadata.get("fix") or _article(describe(_hints(cls)[f.name]))
            problems.add(f"`{prefix}{f.name}` is missing in {source}; set it to {fix}")
            failed.add(f.name)
    if not any(_required(f) for f in _init_fields(cls) if f.name in failed):
        with _gathering_post_init() as found:
            try:
                instance = cls(**kwargs)
            except ValueError as exc:
                found.append(str(exc))
            except Exception:
                # A check that only noted its problem let __post_init__ go on to fail on that same value (the note
                # says it), or a default stood in for a wrong value (its line is there already).
                if not (found or problems.lines):
                    raise
        for message in found:
            if not failed & {m[1] for m in _QUOTED_KEY.finditer(message)}:
                problems.add(f"{source}: {_prefix_keys(message, cls, prefix)}")
    problems.raise_any()
    return instance


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


@contextmanager
def _gathering_post_init() -> Iterator[list[str]]:
    """Within the block, ``at_least``, ``positive`` and ``between`` note their problem in the list yielded."""
    found: list[str] = []
    token = _POST_INIT_PROBLEMS.set(found)
    try:
        yield found
    finally:
        _POST_INIT_PROBLEMS.reset(token)


def check_fields(cls: type, values: Any, source: str, *, prefix: str = "") -> dict[str, Any]:
    """Check the keys and value types of a mapping for dataclass ``cls``; the converted values, missing keys allowed.

    Every unknown key and wrongly typed value of the mapping (nested sections included) is reported in one
    ``ConfigError``, one line each.
    """
    problems = Problems()
    out, _ = _checked_fields(cls, values, source, prefix, problems)
    problems.raise_any()
    return out


def _checked_fields(cls: type, values: Any, source: str, prefix: str, problems: Problems,
                    ) -> tuple[dict[str, Any], set[str]]:
    """The mapping's known keys with their converted values, and the keys whose values are wrong (noted in
    ``problems`` with the unknown keys)."""
    if not isinstance(values, dict):
        what = f"`{prefix[:-1]}` must be" if prefix else "expected"
        what += " a mapping of keys to values"
        raise ConfigError(f"{source}: {what}, got {type(values).__name__}")
    hints = _hints(cls)
    out: dict[str, Any] = {}
    failed: set[str] = set()
    for key, value in values.items():
        if key not in hints:
            problems.add(f"unknown key `{prefix}{key}` in {source}{_suggest(cls, str(key), prefix)}")
            continue
        try:
            out[key] = convert(hints[key], value, f"{prefix}{key}", source)
        except ConfigError as exc:
            problems.lines.extend(exc.problems)
            failed.add(key)
    return out, failed


def convert(tp: Any, value: Any, name: str, source: str, *, want: str | None = None) -> Any:
    """``value`` checked against annotation ``tp`` (and converted: lists to tuples, ints to floats) for key ``name``."""
    want = want or describe(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    def wrong() -> ConfigError:
        return ConfigError(f"{source}: `{name}` must be {want}, got {_show(value)}")

    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        arms = [a for a in args if a is not type(None)]
        if len(arms) != 1:
            raise TypeError(f"{tp}: only `X | None` unions are supported")
        return convert(arms[0], value, name, source, want=want)
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        close = difflib.get_close_matches(value, [str(a) for a in args], n=1) if isinstance(value, str) else []
        hint = f"; did you mean `{close[0]}`?" if close else ""
        words = [a for a in args if isinstance(value, bool) and str(a).lower() in _YAML_BOOL_WORDS[value]]
        if words:
            hint = f"; quote it (\"{words[0]}\"): YAML reads {words[0]} as {str(value).lower()}"
        raise ConfigError(f"{source}: `{name}` must be {want}, got {value!r}{hint}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            hint = "; leave the key out to keep the defaults" if value is None else ""
            raise ConfigError(f"{source}: `{name}` must be a mapping of keys to values, got {value!r}{hint}")
        return from_mapping(tp, value, source, prefix=f"{name}.")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise wrong()
        if args and args[-1] is Ellipsis:
            return tuple(convert(args[0], v, f"{name}[{i}]", source) for i, v in enumerate(value))
        if len(value) != len(args):
            raise wrong()
        return tuple(convert(a, v, f"{name}[{i}]", source) for i, (a, v) in enumerate(zip(args, value)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise wrong()
        return [convert(args[0] if args else Any, v, f"{name}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise wrong()
        key_tp, value_tp = args or (Any, Any)
        return {convert(key_tp, k, f"{name} key {k!r}", source): convert(value_tp, v, f"{name}.{k}", source)
                for k, v in value.items()}
    if tp is float:
        if isinstance(value, str) and _NUMBER_TEXT.fullmatch(value.strip()):
            number = float(value)
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong()
        else:
            number = float(value) if not isinstance(value, int) or abs(value) < 2**1000 else math.inf
        # YAML spells infinity and not-a-number `.inf` and `.nan`; neither is ever a usable setting.
        if not math.isfinite(number):
            raise ConfigError(f"{source}: `{name}` must be a finite number, got {_show(value)}; write an ordinary "
                              "number (YAML reads .inf and .nan as infinity and not-a-number)")
        return number
    # A bool is an int to Python but never to a config: `epochs: true` and `compile: 1` are both mistakes.
    if isinstance(value, bool) != (tp is bool) or not isinstance(value, tp):
        raise wrong()
    if tp is int and not INT_MIN <= value <= INT_MAX:
        raise ConfigError(f"{source}: `{name}` must be between -2**63 and 2**63-1 (a 64-bit integer), "
                          f"got {_show(value)}")
    return value


def _show(value: Any) -> str:
    """``repr(value)``, with an integer too long to print in a line (or at all) described by its size."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"an integer of about {int(value.bit_length() * 0.30103)} digits"
    return repr(value)


def describe(tp: Any) -> str:
    """How an annotation reads in a message: ``int or null``, ``one of adamw, sgd``, ``a list of 2 floats``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any value"
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a) for a in sorted(args, key=lambda a: a is type(None)))
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if dataclasses.is_dataclass(tp) or origin is dict:
        return "a mapping of keys to values"
    if origin is tuple and args and args[-1] is not Ellipsis:
        kinds = {describe(a) for a in args}
        return f"a list of {len(args)} {kinds.pop()}s" if len(kinds) == 1 else f"a list of {len(args)} values"
    if origin in (tuple, list):
        return f"a list of {describe(args[0])}s" if args else "a list"
    return getattr(tp, "__name__", str(tp))


def to_dict(instance: Any) -> dict[str, Any]:
    """A dataclass as plain, YAML-safe data: nested sections as mappings, tuples as lists."""
    return {f.name: _plain(getattr(instance, f.name)) for f in dataclasses.fields(instance)}


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_dict(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in _init_fields(cls)}


def _init_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init]


def _suggest(cls: type, key: str, prefix: str) -> str:
    """``; did you mean `x`?``: the key of a nested section, else a close key here or nested; else the valid keys."""
    known = [f.name for f in _init_fields(cls)]
    nested = _nested_keys(cls)
    # A nested key written one level too high (`temperature` for `loss.temperature`) beats a look-alike here.
    paths = [p for p in nested if p.rsplit(".", 1)[1] == key]
    if not paths:
        close = difflib.get_close_matches(key, known, n=1)
        if close:
            return f"; did you mean `{prefix}{close[0]}`?"
        leaf = difflib.get_close_matches(key, sorted({p.rsplit(".", 1)[1] for p in nested}), n=1)
        paths = [p for p in nested if leaf and p.rsplit(".", 1)[1] == leaf[0]]
    if paths:
        return "; did you mean " + " or ".join(f"`{prefix}{p}`" for p in paths) + "?"
    where = f" in `{prefix[:-1]}`" if prefix else ""
    return f"; valid keys{where}: {', '.join(known)}"


def _nested_keys(cls: type) -> list[str]:
    """Dotted names of the keys inside nested sections (``loss.alpha``, ``student.input.size``)."""
    out = []
    for name, tp in _hints(cls).items():
        if dataclasses.is_dataclass(tp):
            out += [f"{name}.{f.name}" for f in _init_fields(tp)] + [f"{name}.{p}" for p in _nested_keys(tp)]
    return out


def _prefix_keys(message: str, cls: type, prefix: str) -> str:
    """Put ``prefix`` before the backticked keys of ``cls`` in a ``__post_init__`` message."""
    if not prefix:
        return message
    known = {f.name for f in _init_fields(cls)}
    return _QUOTED_KEY.sub(lambda m: f"`{prefix}{m[1]}{m[2]}`" if m[1] in known else m[0], message)


def _article(text: str) -> str:
    if text.startswith(("a ", "an ", "one of", "any ")):
        return text
    return ("an " if text[0] in "aeiou" else "a ") + text


def _value_problem(message: str) -> None:
    """Note ``message`` while ``from_mapping`` gathers a file's problems; otherwise raise it as a ``ValueError``."""
    found = _POST_INIT_PROBLEMS.get()
    if found is None:
        raise ValueError(message)
    found.append(message)


def at_least(name: str, value: int | float | None, low: int | float) -> None:
    """``ValueError`` unless ``value`` (``None`` passes) is at least ``low``."""
    if value is not None and not value >= low:
        what = "non-negative" if low == 0 else f"at least {low}"
        _value_problem(f"`{name}` must be {what}, got {value}")


def positive(name: str, value: int | float | None, example: str) -> None:
    """``ValueError`` unless ``value`` (``None`` passes) is above zero; ``example`` is a value to suggest."""
    if value is not None and not value > 0:
        _value_problem(f"`{name}` must be positive, got {value}; e.g. {example}")


def between(name: str, value: float | None, low: float, high: float, meaning: str = "") -> None:
    """``ValueError`` unless ``low <= value <= high`` (``None`` passes)."""
    if value is not None and not low <= value <= high:
        _value_problem(f"`{name}` must be between {low:g} and {high:g}{meaning}, got {value}")
