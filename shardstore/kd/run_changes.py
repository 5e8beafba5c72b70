"""What a resume may change in a run's configuration: compared before anything is loaded, refused in one line.

A resumed run continues the weights, optimizer moments, data order and schedule of the run it
continues. Settings that define those (the networks, ``num_classes``, the optimizer type, the
data and its order, the seeds, the loss, the global batch) cannot change mid-run: a changed one
would fail deep inside ``load_state_dict`` or, worse, continue silently with something else. They
are refused together, each with its two values. Settings that only steer what comes next (the
length of the run, the lr, logging, evaluation, checkpoints, performance knobs, paths that may
move) are applied and listed.

The reference is the configuration recorded in the checkpoint being resumed (the settings in
force when it was written); a checkpoint without one is compared with ``RUN_DIR/config.yaml``.
Keys the record does not have (settings added to shardstore since) are not compared.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from shardstore.config.resolve import RunConfig, run_config_to_yaml
from shardstore.config.schema import parse_yaml
from shardstore.errors import ConfigError

log = logging.getLogger(__name__)

#: Keys a resume may change (everything else is fixed for the run).
MUTABLE_KEYS = frozenset({
    # where the data is and how fast it is read (the manifest snapshot check catches other content)
    "data.cache_root", "data.cache_shard_size", "data.loader_threads", "data.prefetch_batches",
    "data.read_ahead_shards", "data.drop_finished_pages",
    # how long, how fast, at what precision
    "train.run_dir", "train.epochs", "train.max_steps_per_epoch", "train.lr", "train.base_batch_size",
    "train.weight_decay", "train.momentum", "train.warmup_steps", "train.min_lr_ratio", "train.grad_clip",
    "train.amp", "train.compile", "train.channels_last", "train.threads", "train.ema_decay", "train.preempt_signals",
    # evaluation, checkpoints, logging
    "train.eval.every_epochs", "train.eval.cache_root", "train.eval.max_batches", "train.eval.batch_size",
    "train.checkpoint.keep_last", "train.checkpoint.keep_best", "train.checkpoint.every_steps",
    "train.checkpoint.every_minutes",
    # files that may have moved (the resumed weights come from the checkpoint)
    "model.teacher.checkpoint", "model.student.checkpoint",
})
MUTABLE_SECTIONS = ("train.log.",)
#: Keys that shape the learning-rate schedule: a change recomputes its length.
SCHEDULE_KEYS = frozenset({"train.epochs", "train.max_steps_per_epoch", "train.warmup_steps", "train.min_lr_ratio"})
#: Keys whose value is a mapping compared whole (constructor arguments), not key by key.
WHOLE_VALUE_KEYS = ("kwargs",)
#: A recorded configuration larger than this is not read (shardstore writes a few KiB).
MAX_RECORD_BYTES = 64 << 10
#: A value in a message is cut to this many characters (a hostile record may hold a list of millions).
SHOW_CHARS = 200


@dataclass(frozen=True)
class Change:
    """One key whose value differs between the recorded configuration and the resumed one."""

    key: str
    old: Any
    new: Any

    def describe(self) -> str:
        return f"{self.key} {show(self.old)} -> {show(self.new)}"


@dataclass(frozen=True)
class ResumeChanges:
    """The changes a resume applies (all of them allowed) and where the reference came from."""

    applied: tuple[Change, ...]
    reference: str

    def has(self, *keys: str) -> bool:
        return any(c.key in keys for c in self.applied)

    def get(self, key: str) -> Change | None:
        return next((c for c in self.applied if c.key == key), None)

    @property
    def schedule_changed(self) -> bool:
        return any(c.key in SCHEDULE_KEYS for c in self.applied)


def show(value: Any) -> str:
    """A value as the YAML a user would write (``cnn_small``, ``{width: 4}``, ``[SIGTERM, SIGINT]``, ``null``).

    Always one short line: a value from someone else's record may hold newlines or millions of items.
    """
    if isinstance(value, (list, dict)) and len(value) > SHOW_CHARS:
        return f"<a {type(value).__name__} of {len(value):,} items>"
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 16).strip().removesuffix("...").strip()
    if "\n" in text or not text.isprintable():
        text = json.dumps(value, default=str)
    return text if len(text) <= SHOW_CHARS else text[: SHOW_CHARS - 3] + "..."


def flatten(values: Any, prefix: str = "") -> dict[str, Any]:
    """Nested sections as dotted keys; a mapping under ``kwargs`` stays one value."""
    out: dict[str, Any] = {}
    if not isinstance(values, dict):
        return out
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and key not in WHOLE_VALUE_KEYS:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def is_mutable(key: str) -> bool:
    return key in MUTABLE_KEYS or key.startswith(MUTABLE_SECTIONS)


def recorded_config(state: dict[str, Any], run_dir: Path) -> tuple[dict[str, Any] | None, str]:
    """The configuration the checkpoint was written under (as plain data) and where it was found."""
    text, where = state.get("config"), "the checkpoint"
    if not isinstance(text, str):
        where = str(run_dir / "config.yaml")
        text = _read_record(run_dir / "config.yaml")
        if text is None:
            return None, "nothing"
    problem = None
    if len(text) > MAX_RECORD_BYTES:
        problem = f"it is {len(text):,} characters long"
    else:
        try:
            values = parse_yaml(text)
        except yaml.YAMLError as exc:
            problem = " ".join(str(exc).split())[:SHOW_CHARS]
        else:
            if isinstance(values, dict) and all(isinstance(v, dict) for v in values.values()):
                return values, where
            problem = "it is not a mapping of sections"
    log.warning("%s: the recorded configuration cannot be read (%s), so this resume is not compared with it; check "
                "that the settings are the ones the run started with", where, problem)
    return None, where


def _read_record(path: Path) -> str | None:
    """``RUN_DIR/config.yaml`` as text, or None when it is missing or not a plain file (a FIFO would block a read,
    a symlink could lead out of the run directory, ``/dev/zero`` never ends)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        log.warning("%s is not a plain file; this resume is not compared with it", path)
        return None
    with os.fdopen(fd, "rb") as f:
        return f.read(MAX_RECORD_BYTES + 1).decode("utf-8", errors="replace")


def check_resume(state: dict[str, Any], cfg: RunConfig, *, run_dir: Path, source: Path | None,
                 world_size: int) -> ResumeChanges:
    """The allowed changes between ``state``'s recorded configuration and ``cfg``; ``ConfigError`` naming every
    fixed key that changed (with both values), or a length too short for where the run already is."""
    _check_state(state, source if source is not None else run_dir)
    old_values, where = recorded_config(state, run_dir)
    if old_values is None:
        return ResumeChanges((), where)
    old, new = flatten(old_values), flatten(parse_yaml(run_config_to_yaml(cfg)))
    changes = [Change(key, old[key], new[key]) for key in new if key in old and old[key] != new[key]]
    fixed = [c for c in changes if not is_mutable(c.key) and c.key != "train.batch_size"]
    applied = [c for c in changes if is_mutable(c.key)]
    name = source if source is not None else run_dir
    # The global batch (samples per step over all ranks) fixes the data order; the per-rank batch may follow the ranks.
    saved_global = (state.get("sampler") or {}).get("global_batch")
    batch = next((c for c in changes if c.key == "train.batch_size"), None)
    if isinstance(saved_global, int) and saved_global != cfg.train.batch_size * world_size:
        fixed.append(Change("train.batch_size x ranks (the global batch)", saved_global,
                            cfg.train.batch_size * world_size))
    elif batch is not None:
        applied.append(batch)
    if fixed:
        raise ConfigError(f"{name}: cannot resume with these settings changed, they are fixed for a run: "
                          + ", ".join(c.describe() for c in fixed)
                          + "; resume with the values the run started with (see its config.yaml), or start a new "
                          "run in another train.run_dir")
    _check_length(state, cfg, name)
    return ResumeChanges(tuple(applied), where)


def _check_state(state: dict[str, Any], name: Path) -> None:
    """The values the comparison reads have their types (a checkpoint may come from someone else)."""
    epoch = state.get("epoch", 0)
    for key, value, ok in (("epoch", epoch, isinstance(epoch, int) and not isinstance(epoch, bool) and epoch >= 0),
                           ("sampler", state.get("sampler"), isinstance(state.get("sampler") or {}, dict))):
        if not ok:
            raise ConfigError(f"{name}: not a shardstore training checkpoint (its {key} is {show(value)}); pass "
                              "--resume-from a checkpoint this run wrote, or start a new run in another train.run_dir")


def _check_length(state: dict[str, Any], cfg: RunConfig, name: Path) -> None:
    """A shorter ``epochs`` or ``max_steps_per_epoch`` cannot end before where the run already is."""
    epoch, complete = state.get("epoch", 0), bool(state.get("epoch_complete", True))
    needed = epoch + 1
    if cfg.train.epochs < needed:
        done = f"finished {needed} epochs" if complete else f"is in epoch {needed}"
        raise ConfigError(f"{name}: train.epochs {cfg.train.epochs} is less than where the run is (it {done}); "
                          f"set train.epochs to at least {needed}")
    sampler = state.get("sampler") or {}
    consumed, per_step = sampler.get("samples_consumed"), sampler.get("global_batch")
    cap = cfg.train.max_steps_per_epoch
    if complete or cap is None or not isinstance(consumed, int) or not isinstance(per_step, int) or per_step < 1:
        return
    taken = consumed // per_step
    if cap < taken:
        raise ConfigError(f"{name}: train.max_steps_per_epoch {cap} is less than the {taken} steps epoch {needed} "
                          f"already took; set it to at least {taken} (it applies from this epoch on)")


def describe_applied(changes: ResumeChanges) -> str:
    """``train.epochs 3 -> 5, train.lr 0.01 -> 0.005`` (empty when nothing changed)."""
    return ", ".join(c.describe() for c in changes.applied)
