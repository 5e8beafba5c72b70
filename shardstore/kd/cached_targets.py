"""Training-time cached teacher targets: one stored view per sample and step, and its targets."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from shardstore.kd.augment import view_generator
from shardstore.kd.target_spec import TargetSpec
from shardstore.kd.targets import SparseLogits, teacher_log_probs
from shardstore.sampling.seeds import PICK_STORED_VIEW, derive_seed


@dataclass
class PickedTargets:
    """One stored view per sample of a batch, and the teacher's targets for it (on the batch's device)."""

    views: Tensor  # [B, 5] float32
    log_probs: Tensor | None  # [B, C] at the training temperature (top-k targets)
    logits: Tensor | None  # [B, C] float32 (dense targets)
    features: Tensor | None  # [B, D] float32


class CachedTargets:
    """Picks, for each sample of a batch, one of its K stored views from ``(seed, step)`` alone.

    The same seed, step and batch give the same choice, so a resumed run trains on exactly
    the views and targets it would have used without the interruption.
    """

    def __init__(self, spec: TargetSpec, seed: int, *, temperature: float, tail: str) -> None:
        self.spec = spec
        self.seed = derive_seed(seed, stream=PICK_STORED_VIEW)
        self.temperature = temperature
        self.tail = tail
        self.names = spec.field_names()

    def choose(self, batch_size: int, step: int) -> Tensor:
        """The view index ``[B]`` (int64, CPU) of each sample at ``step``."""
        return torch.randint(self.spec.views, (batch_size,), generator=view_generator(self.seed, step))

    def pick(self, batch: dict[str, Tensor], step: int) -> PickedTargets:
        """Each sample's view at ``step`` and its targets (log-probabilities at the training temperature)."""
        n = batch[self.names["views"]].shape[0]
        return self.take(batch, self.choose(n, step), self.temperature)

    def take(self, batch: dict[str, Tensor], which: Tensor, temperature: float) -> PickedTargets:
        """View ``which[i]`` of sample ``i`` and its targets, top-k ones as log-probabilities at ``temperature``."""
        stored_views = batch[self.names["views"]]
        device = stored_views.device
        rows = torch.arange(stored_views.shape[0], device=device)
        which = which.to(device)

        def take(role: str) -> Tensor:
            return batch[self.names[role]][rows, which]

        log_probs = logits = features = None
        if self.spec.logits == "topk":
            sparse = SparseLogits(take("index"), take("logp"), take("tail"), self.spec.num_classes)
            log_probs = teacher_log_probs(sparse, temperature, self.tail)
        elif self.spec.logits == "dense":
            logits = take("logits").float()
        if self.spec.embedding_dim:
            features = take("embedding").float()
        return PickedTargets(take("views").float(), log_probs, logits, features)
