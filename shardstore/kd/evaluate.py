"""Evaluation on held-out shards: the student's top-1 against labels, its agreement with and KL to the teacher."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from shardstore.kd.augment import apply_views, center_views
from shardstore.kd.cached_targets import CachedTargets
from shardstore.kd.images import ImageFormat
from shardstore.kd.losses import kl_per_sample
from shardstore.loader import ShardLoader
from shardstore.store.reader import ShardStore


@torch.no_grad()
def evaluate(student: nn.Module, teacher: nn.Module | None, store: ShardStore, *, size: int, batch_size: int,
             device: torch.device, image_field: str = "images", label_field: str = "labels",
             image_format: ImageFormat | None = None, max_batches: int | None = None, autocast: bool = False,
             teacher_logits_field: str | None = None, cached: CachedTargets | None = None) -> dict[str, float]:
    """Metrics over ``store`` read whole in id order; each image is resized to ``size`` (no crop, no flip).

    ``image_format`` (``shardstore.kd.images``) names the fields and says how their values
    are read; without it, ``image_field`` holds uint8 ``[C, H, W]`` images and ``label_field``
    their labels.

    Returns ``top1`` and, with a teacher (or its cached logits), ``agreement`` (same argmax),
    ``kl`` (KL(teacher || student) at temperature 1, per sample) and ``teacher_top1``. With
    ``cached`` teacher targets (and no live teacher) those three compare the student with the
    stored targets of each image's first stored view, on that view replayed: the teacher's
    outputs exist only for the stored views, not for the whole image.
    """
    fmt = image_format or ImageFormat(image_field=image_field, label_field=label_field)
    was_training = student.training
    student.eval()
    sums = {"top1": 0.0, "agreement": 0.0, "kl": 0.0, "teacher_top1": 0.0}
    count = 0
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else nullcontext()
    teacher_dtype = next(teacher.parameters()).dtype if teacher is not None else None
    with ShardLoader(store, batch_size, device=device if device.type == "cuda" else None, drop_last=False,
                     prepare_next_epoch=False) as loader:
        for b, batch in enumerate(loader):
            if max_batches is not None and b >= max_batches:
                break
            images = fmt.images(batch[fmt.image_field].to(device, non_blocking=True))
            labels = fmt.labels(batch[fmt.label_field].to(device, non_blocking=True))
            x = apply_views(images, center_views(images.shape[0], images.shape[2], images.shape[3]).to(device), size)
            with amp:
                logits = student(x).float()
                compared, log_p_t = logits, None  # the student's logits on the input the teacher's refer to
                if teacher_logits_field is not None:
                    log_p_t = torch.log_softmax(batch[teacher_logits_field].to(device).float(), 1)
                elif teacher is not None:
                    log_p_t = torch.log_softmax(teacher(x.to(teacher_dtype)).float(), 1)
                elif cached is not None:
                    first = cached.take({k: batch[k].to(device) for k in cached.names.values()},
                                        torch.zeros(labels.shape[0], dtype=torch.long), 1.0)
                    compared = student(apply_views(images, first.views, size)).float()
                    if first.logits is not None:
                        log_p_t = torch.log_softmax(first.logits, 1)
                    else:
                        log_p_t = first.log_probs  # None when only embeddings were cached
            n = labels.shape[0]
            count += n
            sums["top1"] += (logits.argmax(1) == labels).sum().item()
            if log_p_t is not None:
                teacher_pick = log_p_t.argmax(1)
                sums["agreement"] += (compared.argmax(1) == teacher_pick).sum().item()
                sums["teacher_top1"] += (teacher_pick == labels).sum().item()
                sums["kl"] += kl_per_sample(log_p_t, torch.log_softmax(compared, 1)).sum().item()
    student.train(was_training)
    if count == 0:
        return {}
    out = {"top1": sums["top1"] / count}
    has_logits = cached is not None and cached.spec.logits != "none"
    if teacher is not None or teacher_logits_field is not None or has_logits:
        out |= {k: sums[k] / count for k in ("agreement", "kl", "teacher_top1")}
    out["samples"] = float(count)
    return out
