"""Evaluation on held-out shards: the student's top-1 against labels, its agreement with and KL to the teacher."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from shardstore.kd.augment import apply_views, center_views
from shardstore.loader import ShardLoader
from shardstore.manifest.reader import ShardStore


@torch.no_grad()
def evaluate(student: nn.Module, teacher: nn.Module | None, store: ShardStore, *, image_field: str,
             label_field: str, size: int, batch_size: int, device: torch.device, max_batches: int | None = None,
             autocast: bool = False, teacher_logits_field: str | None = None) -> dict[str, float]:
    """Metrics over ``store`` read whole in id order; each image is resized to ``size`` (no crop, no flip).

    Returns ``top1`` and, with a teacher (or its cached logits), ``agreement`` (same argmax),
    ``kl`` (KL(teacher || student) at temperature 1, per sample) and ``teacher_top1``.
    """
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
            images = batch[image_field].to(device, non_blocking=True)
            labels = batch[label_field].to(device, non_blocking=True).long()
            x = apply_views(images, center_views(images.shape[0], images.shape[2], images.shape[3]).to(device), size)
            with amp:
                logits = student(x).float()
                if teacher_logits_field is not None:
                    t_logits = batch[teacher_logits_field].to(device).float()
                elif teacher is not None:
                    t_logits = teacher(x.to(teacher_dtype)).float()
                else:
                    t_logits = None
            n = labels.shape[0]
            count += n
            sums["top1"] += (logits.argmax(1) == labels).sum().item()
            if t_logits is not None:
                sums["agreement"] += (logits.argmax(1) == t_logits.argmax(1)).sum().item()
                sums["teacher_top1"] += (t_logits.argmax(1) == labels).sum().item()
                log_p_t = torch.log_softmax(t_logits, 1)
                sums["kl"] += (log_p_t.exp() * (log_p_t - torch.log_softmax(logits, 1))).sum().item()
    student.train(was_training)
    if count == 0:
        return {}
    out = {"top1": sums["top1"] / count}
    if teacher is not None or teacher_logits_field is not None:
        out |= {k: sums[k] / count for k in ("agreement", "kl", "teacher_top1")}
    out["samples"] = float(count)
    return out
