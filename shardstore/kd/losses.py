"""Distillation losses (soft-target KL, cross-entropy, feature matching) and the batch metrics logged beside them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shardstore.errors import ConfigError

FEATURE_LOSSES = ("none", "cosine", "smooth_l1", "mse")


def kd_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """KL(softmax(teacher / T) || softmax(student / T)), averaged over the batch and scaled by T².

    The T² factor (Hinton et al., 2015) keeps the gradient with respect to the student logits,
    ``T * (softmax(s / T) - softmax(t / T)) / batch``, about the same size whatever the
    temperature, so changing T does not silently change the weight of the term. Computed in
    float32 even under autocast: the softmax of low-precision logits loses the small
    probabilities that carry the teacher's "dark knowledge".
    """
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * (temperature * temperature)


def build_projector(student_dim: int, teacher_dim: int, hidden: int = 0) -> nn.Module:
    """A map from student to teacher feature space: a Linear, or Linear-GELU-Linear when ``hidden`` > 0."""
    if hidden > 0:
        return nn.Sequential(nn.Linear(student_dim, hidden), nn.GELU(), nn.Linear(hidden, teacher_dim))
    return nn.Linear(student_dim, teacher_dim)


def kd_kl_from_log_probs(student_logits: Tensor, teacher_log_probs_t: Tensor, temperature: float) -> Tensor:
    """``T^2 * KL(teacher || softmax(student / T))`` with the teacher given as log-probabilities at ``T``.

    Classes the teacher gives probability 0 (``-inf``, a renormalised top-k) add nothing.
    """
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return kl_per_sample(teacher_log_probs_t, log_p_student).mean() * temperature**2


def kl_per_sample(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) of each row (last dimension) from log-probabilities; classes p gives 0 (``-inf``) add nothing."""
    return (log_p.exp() * (log_p - log_q)).nan_to_num(0.0).sum(-1)


UNLABELED = -1
"""The label of a sample that has none (semi-supervised distillation): only the KD term teaches it."""


class DistillationLoss(nn.Module):
    """``alpha * kd_kl + (1 - alpha) * cross_entropy + feature_weight * feature_term``.

    Terms with weight zero are not computed and are left out of the returned parts: with
    ``alpha=0`` the loss is plain cross-entropy (no teacher needed), with ``alpha=1`` it is the
    KD term alone. Without labels (``labels=None``) the cross-entropy term is dropped and the
    KD term is used alone with weight 1, whatever ``alpha`` is.

    With ``feature_loss`` other than ``"none"``, a learnable projector (``self.projector``)
    maps the student's pooled features ``[B, student_dim]`` to ``[B, teacher_dim]``; being a
    submodule, its parameters belong in the optimizer and its weights in the checkpoint. The
    feature term compares the raw projected student features with the raw teacher features
    (no L2 normalisation): ``cosine`` is ``1 - cosine_similarity`` averaged over the batch,
    ``smooth_l1`` (beta 1) and ``mse`` are averaged over all elements. With ``feature_loss``
    ``"none"`` there is no projector and ``feature_weight`` is unused.
    """

    def __init__(
        self,
        *,
        alpha: float,
        temperature: float,
        feature_loss: str = "none",
        feature_weight: float = 0.0,
        student_dim: int = 0,
        teacher_dim: int = 0,
        projector_hidden: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(
                f"distillation `alpha` must be in [0, 1], got {alpha}; 0 is plain cross-entropy, 1 is KD only"
            )
        if not temperature > 0.0:
            raise ConfigError(f"distillation `temperature` must be positive, got {temperature}; 1 to 4 is usual")
        if not feature_weight >= 0.0:
            raise ConfigError(f"distillation `feature_weight` must be non-negative, got {feature_weight}")
        if feature_loss not in FEATURE_LOSSES:
            valid = ", ".join(f"`{name}`" for name in FEATURE_LOSSES)
            raise ConfigError(f"unknown distillation `feature_loss` {feature_loss!r}; use one of {valid}")
        if projector_hidden < 0:
            raise ConfigError(
                f"distillation `projector_hidden` must be non-negative, got {projector_hidden}; 0 is a single Linear"
            )
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.feature_loss = feature_loss
        self.feature_weight = float(feature_weight)
        self.projector: nn.Module | None = None
        if feature_loss != "none":
            if student_dim < 1 or teacher_dim < 1:
                raise ConfigError(
                    f"feature_loss {feature_loss!r} needs the feature sizes, got student_dim={student_dim}, "
                    f"teacher_dim={teacher_dim}; pass both (at least 1) or set feature_loss `none`"
                )
            self.projector = build_projector(student_dim, teacher_dim, projector_hidden)
        self.student_dim = int(student_dim)
        self.teacher_dim = int(teacher_dim)

    def forward(
        self,
        student_logits: Tensor,
        labels: Tensor | None,
        teacher_logits: Tensor | None = None,
        student_features: Tensor | None = None,
        teacher_features: Tensor | None = None,
        teacher_log_probs: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The total loss (float32, differentiable) and its detached parts (0-d tensors): loss, kd, ce, feature.

        The teacher comes as ``teacher_logits`` or, from cached top-k targets, as
        ``teacher_log_probs`` already at the temperature (``shardstore.kd.targets``).

        The parts stay on the device: reading them (``float(part)``) waits for the GPU, so a
        training loop does it only when it logs.
        """
        kd_weight = 1.0 if labels is None else self.alpha
        ce_weight = 0.0 if labels is None else 1.0 - self.alpha
        parts: dict[str, Tensor] = {}
        total = student_logits.new_zeros((), dtype=torch.float32)
        if kd_weight > 0.0:
            if teacher_logits is None and teacher_log_probs is None:
                why = "labels is None" if labels is None else f"alpha={self.alpha}"
                raise ValueError(f"the KD term needs teacher_logits ({why}); pass them, or use alpha=0 with labels")
            if teacher_logits is not None:
                parts["kd"] = kd_kl(student_logits, teacher_logits, self.temperature)
            else:
                parts["kd"] = kd_kl_from_log_probs(student_logits, teacher_log_probs, self.temperature)
            total = total + kd_weight * parts["kd"]
        if labels is not None and ce_weight > 0.0:
            # Label -1 marks an unlabeled sample: no label term for it (the KD term still teaches it).
            # Sum over the labeled ones / their count (at least 1): a batch without labels adds 0, not NaN.
            ce = F.cross_entropy(student_logits.float(), labels, ignore_index=UNLABELED, reduction="sum")
            parts["ce"] = ce / (labels != UNLABELED).sum().clamp(min=1)
            total = total + ce_weight * parts["ce"]
        if self.projector is not None:
            parts["feature"] = self.feature_term(student_features, teacher_features)
            total = total + self.feature_weight * parts["feature"]
        parts = {"loss": total, **parts}
        return total, {name: part.detach().float() for name, part in parts.items()}

    def feature_term(self, student_features: Tensor | None, teacher_features: Tensor | None) -> Tensor:
        """The configured feature loss between projected student features and teacher features."""
        if self.projector is None:
            raise ValueError("feature_loss is `none`: there is no feature term to compute")
        if student_features is None or teacher_features is None:
            given = {"student_features": student_features, "teacher_features": teacher_features}
            missing = " and ".join(name for name, value in given.items() if value is None)
            raise ValueError(f"feature_loss {self.feature_loss!r} needs {missing}; pass both feature tensors")
        if student_features.dim() != 2 or student_features.shape[1] != self.student_dim:
            raise ValueError(f"student_features must be [B, {self.student_dim}], got {list(student_features.shape)}")
        if teacher_features.shape != (student_features.shape[0], self.teacher_dim):
            want = [student_features.shape[0], self.teacher_dim]
            raise ValueError(f"teacher_features must be {want}, got {list(teacher_features.shape)}")
        # match the projector's weights (a bf16 student outside autocast); autocast still picks its own dtype
        weight_dtype = next(self.projector.parameters()).dtype
        projected = self.projector(student_features.to(weight_dtype)).float()
        target = teacher_features.float()
        if self.feature_loss == "cosine":
            return 1.0 - F.cosine_similarity(projected, target, dim=-1).mean()
        if self.feature_loss == "smooth_l1":
            return F.smooth_l1_loss(projected, target)
        return F.mse_loss(projected, target)


def top1(logits: Tensor, labels: Tensor) -> float:
    """Fraction of the batch whose highest logit is the label."""
    _check_batch(logits, labels)
    return (logits.argmax(dim=-1) == labels).float().mean().item()


def agreement(student_logits: Tensor, teacher_logits: Tensor) -> float:
    """Fraction of the batch where student and teacher pick the same class."""
    _check_batch(student_logits, teacher_logits)
    return (student_logits.argmax(dim=-1) == teacher_logits.argmax(dim=-1)).float().mean().item()


def kl_to_teacher(student_logits: Tensor, teacher_logits: Tensor) -> float:
    """KL(teacher || student) at temperature 1, averaged over the batch (in nats)."""
    _check_batch(student_logits, teacher_logits)
    with torch.no_grad():
        return kd_kl(student_logits, teacher_logits, 1.0).item()


def _check_batch(logits: Tensor, other: Tensor) -> None:
    """Refuse an empty batch (its mean is undefined) and batches of different sizes."""
    if logits.shape[0] == 0:
        raise ValueError("metrics need a non-empty batch")
    if other.shape[0] != logits.shape[0]:
        raise ValueError(f"batch sizes differ: {logits.shape[0]} logits vs {other.shape[0]}")
