"""``check_teacher_cache``: recompute a sample of stored teacher targets with the live teacher on the replayed views.

The targets are written by ``shardstore.kd.teacher_cache``; this proves that what training replays from them is what
the teacher would say: the stored views are the seeded draw, and the live teacher on those views agrees with the
stored logits (and embeddings) up to float16 rounding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from shardstore.config.resolve import RunConfig
from shardstore.kd.autocast import autocast_for
from shardstore.kd.images import SETTING_KEYS, ImageFormat, image_format
from shardstore.kd.losses import kl_per_sample
from shardstore.kd.models.io import InputAdapter
from shardstore.kd.target_spec import TargetSpec, read_target_spec, shard_views
from shardstore.kd.targets import SparseLogits, encode_topk, teacher_log_probs
from shardstore.kd.teacher import TEACHER_KEYS, load_teacher, render_teacher_input, teacher_forward, teacher_identity
from shardstore.sampling.seeds import CHECK_SAMPLES, rng_for
from shardstore.store.groups import check_group_name
from shardstore.store.reader import ShardStore


@dataclass
class CheckReport:
    """How well stored targets match the live teacher on the replayed views (worst values over the sample)."""

    spec: TargetSpec
    checked: int = 0
    views_not_redrawn: int = 0  # stored views that differ from the seeded draw
    top1_match: float | None = None
    worst_kl: float | None = None
    mean_kl: float | None = None
    worst_cosine: float | None = None
    teacher_differs: str | None = None
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.checked > 0 and not self.failures


@dataclass(frozen=True)
class _Picks:
    """The (shard position, row, view) of each checked stored target, in shard order."""

    positions: np.ndarray
    rows: np.ndarray
    views: np.ndarray

    def __len__(self) -> int:
        return int(self.positions.size)

    def __getitem__(self, part: slice) -> _Picks:
        return _Picks(self.positions[part], self.rows[part], self.views[part])


@dataclass
class _Agreement:
    """Per checked view: KL(live || stored), whether the top-1 classes agree, the embeddings' cosine."""

    kl: list[Tensor] = field(default_factory=list)
    top1: list[Tensor] = field(default_factory=list)
    cosine: list[Tensor] = field(default_factory=list)


@torch.no_grad()
def check_teacher_cache(cfg: RunConfig, *, name: str = "teacher", samples: int = 64, seed: int = 0,
                        batch_size: int = 256, device: str | torch.device | None = None, max_kl: float = 1e-2,
                        min_top1: float = 0.99, min_cosine: float = 0.99) -> CheckReport:
    """Recompute ``samples`` random stored (sample, view) targets with the live teacher on the replayed views.

    Three things are checked: the stored view equals the one drawn again from the group's
    seed (so the augmentation really is replayable); the teacher's top-1 on the replayed
    view matches the stored one in at least ``min_top1`` of the checked views; and the
    targets agree — for top-k logits the live logits are encoded the same way and both are
    rebuilt (``tail="spread"``) before taking KL(live || stored), so the only difference
    left is float16 rounding (and bf16 if the cache was made under bf16 autocast); dense
    logits are compared by the KL of their softmaxes; embeddings by cosine similarity.
    """
    root = Path(cfg.data.cache_root)
    spec = read_target_spec(root, check_group_name(name))
    fmt, store = image_format(cfg.data, ShardStore.open(root), labels=False)
    report = CheckReport(spec)
    report.failures += _image_format_differs(spec, fmt)
    picks = _pick_stored_views(store, spec, samples, seed)
    if picks is None:
        report.failures.append(f"no shard of {root} has the targets {name!r}; fill them with cache-teacher first")
        return report
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher = load_teacher(cfg, dev)
    report.teacher_differs = _teacher_differs(cfg, dev, spec)
    agreement, redrawn = _Agreement(), {}
    for lo in range(0, len(picks), batch_size):
        images, stored, not_redrawn = _read_stored(store, spec, fmt, picks[lo:lo + batch_size], redrawn)
        report.views_not_redrawn += not_redrawn
        _compare_with_live(teacher, spec, fmt.images(images.to(dev)), {k: v.to(dev) for k, v in stored.items()},
                           autocast_for(cfg, dev), agreement)
    report.checked = len(picks)
    _judge(report, agreement, max_kl=max_kl, min_top1=min_top1, min_cosine=min_cosine)
    return report


def _image_format_differs(spec: TargetSpec, fmt: ImageFormat) -> list[str]:
    """A failure when the data config reads the images otherwise than the run that made the targets."""
    differ = [k for k, v in fmt.settings().items() if spec.image_format.get(k) != v]
    if not differ:
        return []
    key = differ[0]
    return [f"the targets were made on images read with {key} {spec.image_format.get(key)!r}, "
            f"the data config reads them with {getattr(fmt, key)!r} (data.{SETTING_KEYS[key]})"]


def _pick_stored_views(store: ShardStore, spec: TargetSpec, samples: int, seed: int) -> _Picks | None:
    """Up to ``samples`` distinct samples of the shards that hold the group, drawn from ``seed``, one view each.

    None when no shard holds the group.
    """
    positions = np.asarray(store.manifest.positions_with(list(spec.field_names().values())), dtype=np.int64)
    if not positions.size:
        return None
    counts = np.asarray(store.counts[positions], dtype=np.int64)
    total = int(counts.sum())
    rng = rng_for(seed, CHECK_SAMPLES)
    picks = np.sort(rng.choice(total, size=min(samples, total), replace=False))
    views = rng.integers(0, spec.views, size=picks.size)
    starts = np.concatenate([[0], np.cumsum(counts)])
    at = np.searchsorted(starts, picks, side="right") - 1
    return _Picks(positions[at], picks - starts[at], views)


def _teacher_differs(cfg: RunConfig, device: torch.device, spec: TargetSpec) -> str | None:
    """What tells the configured teacher from the one that made the targets (None: the same teacher)."""
    identity = teacher_identity(cfg, device)
    differ = [k for k in TEACHER_KEYS if identity[k] != spec.teacher.get(k)]
    if not differ:
        return None
    return (f"the model config's teacher differs from the one that made the targets in "
            f"{differ[0]} ({identity[differ[0]]!r} vs {spec.teacher[differ[0]]!r})")


def _read_stored(store: ShardStore, spec: TargetSpec, fmt: ImageFormat, picks: _Picks,
                 redrawn: dict[int, Tensor]) -> tuple[Tensor, dict[str, Tensor], int]:
    """The picked images, their stored targets by role, and how many stored views differ from the seeded draw.

    ``redrawn`` caches each shard's views drawn again from the group's seed.
    """
    names = spec.field_names()
    images, stored = [], {role: [] for role in names}
    not_redrawn = 0
    for position, row, view in zip(picks.positions.tolist(), picks.rows.tolist(), picks.views.tolist()):
        entry = store.shards[position]
        if entry.id not in redrawn:
            redrawn[entry.id] = shard_views(spec, entry.id, entry.num_samples)
        images.append(torch.from_numpy(store.read(position, fmt.image_field, row)))
        for role, fname in names.items():
            stored[role].append(torch.from_numpy(store.read(position, fname, (row, view))))
        not_redrawn += not torch.equal(stored["views"][-1].float(), redrawn[entry.id][row, view])
    return torch.stack(images), {role: torch.stack(ts) for role, ts in stored.items()}, not_redrawn


def _compare_with_live(teacher: InputAdapter, spec: TargetSpec, images: Tensor, stored: dict[str, Tensor],
                       amp: object, agreement: _Agreement) -> None:
    """Run the teacher on the stored views of ``images`` and add how its outputs agree with ``stored``."""
    x = render_teacher_input(images, stored["views"], teacher)
    with amp:
        logits, features = teacher_forward(teacher, x.to(next(teacher.parameters()).dtype),
                                           features=spec.embedding_dim > 0)
    if spec.logits == "topk":
        live = encode_topk(logits, spec.topk)
        mine = SparseLogits(stored["index"], stored["logp"], stored["tail"], spec.num_classes)
        agreement.kl.append(kl_per_sample(teacher_log_probs(live, 1.0), teacher_log_probs(mine, 1.0)))
        agreement.top1.append((stored["index"][:, 0].long() == logits.argmax(-1)).float())
    elif spec.logits == "dense":
        log_live, log_stored = torch.log_softmax(logits, -1), torch.log_softmax(stored["logits"].float(), -1)
        agreement.kl.append(kl_per_sample(log_live, log_stored))
        agreement.top1.append((stored["logits"].float().argmax(-1) == logits.argmax(-1)).float())
    if features is not None:
        agreement.cosine.append(torch.nn.functional.cosine_similarity(features, stored["embedding"].float(), dim=-1))


def _judge(report: CheckReport, agreement: _Agreement, *, max_kl: float, min_top1: float, min_cosine: float) -> None:
    """Fill the report's figures and add a failure for each bound the checked views miss."""
    if report.views_not_redrawn:
        report.failures.append(f"{report.views_not_redrawn} of {report.checked} stored views differ from the views "
                               f"drawn again from seed {report.spec.seed}: the view parameters were changed or "
                               "corrupted")
    if agreement.kl:
        kl = torch.cat(agreement.kl)
        report.worst_kl, report.mean_kl = float(kl.max()), float(kl.mean())
        report.top1_match = float(torch.cat(agreement.top1).mean())
        if report.top1_match < min_top1:
            report.failures.append(f"the live teacher's top-1 matches the stored one on {100 * report.top1_match:.1f}% "
                                   f"of the replayed views (need {100 * min_top1:.1f}%)")
        if report.worst_kl > max_kl:
            report.failures.append(f"worst KL(live || stored) is {report.worst_kl:.4g} nats (allowed {max_kl:g})")
    if agreement.cosine:
        report.worst_cosine = float(torch.cat(agreement.cosine).min())
        if report.worst_cosine < min_cosine:
            report.failures.append(f"worst embedding cosine is {report.worst_cosine:.4f} (need {min_cosine})")
