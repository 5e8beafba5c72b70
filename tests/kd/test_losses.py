"""Distillation losses: the KD term against its formula, the weighting of the parts, feature terms, metrics, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shardstore.errors import ConfigError
from shardstore.kd.losses import DistillationLoss, agreement, kd_kl, kl_to_teacher, top1


def logits_pair(batch: int = 6, classes: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, classes, generator=gen) * 2, torch.randn(batch, classes, generator=gen) * 2


def kd_reference(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> float:
    """sum_c p_t (log p_t - log p_s) / B * T², written out in float64."""
    s, t = student.double() / temperature, teacher.double() / temperature
    log_ps = s - torch.logsumexp(s, dim=1, keepdim=True)
    log_pt = t - torch.logsumexp(t, dim=1, keepdim=True)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(dim=1).mean()
    return float(kl) * temperature**2


@pytest.mark.parametrize("temperature", [1.0, 2.5, 4.0])
def test_kd_kl_matches_formula(temperature: float) -> None:
    student, teacher = logits_pair()
    got = kd_kl(student, teacher, temperature)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert got.item() == pytest.approx(kd_reference(student, teacher, temperature), rel=1e-5)


def test_kd_kl_is_zero_for_equal_logits_and_float32_for_bf16() -> None:
    student, _ = logits_pair()
    assert kd_kl(student, student.clone(), 3.0).item() == pytest.approx(0.0, abs=1e-6)
    low = kd_kl(student.bfloat16(), (student + 1.0).bfloat16(), 2.0)  # a shift leaves the softmax alone
    assert low.dtype == torch.float32 and low.item() == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 3.0, 8.0])
def test_kd_kl_gradient_is_t_times_probability_gap(temperature: float) -> None:
    student, teacher = logits_pair(batch=4)
    student.requires_grad_(True)
    kd_kl(student, teacher, temperature).backward()
    s, t = student.detach().double(), teacher.double()
    manual = temperature * (F.softmax(s / temperature, 1) - F.softmax(t / temperature, 1)) / s.shape[0]
    torch.testing.assert_close(student.grad.double(), manual, rtol=1e-4, atol=1e-7)


def test_t_squared_keeps_gradient_scale_at_high_temperature() -> None:
    # Hinton et al.: for large T and zero-mean logits the scaled gradient tends to (s - t) / (C * B)
    student, teacher = logits_pair(batch=3, classes=4, seed=1)
    student, teacher = student - student.mean(1, keepdim=True), teacher - teacher.mean(1, keepdim=True)
    student.requires_grad_(True)
    kd_kl(student, teacher, 200.0).backward()
    limit = (student.detach() - teacher) / (student.shape[1] * student.shape[0])
    torch.testing.assert_close(student.grad, limit, rtol=2e-2, atol=1e-4)


def test_alpha_zero_is_plain_cross_entropy_without_a_teacher() -> None:
    student, _ = logits_pair()
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    loss, parts = DistillationLoss(alpha=0.0, temperature=2.0)(student, labels)
    assert set(parts) == {"loss", "ce"}
    assert loss.item() == pytest.approx(F.cross_entropy(student, labels).item(), rel=1e-6)
    assert float(parts["loss"]) == pytest.approx(float(parts["ce"])) and parts["ce"].ndim == 0


def test_alpha_one_is_kd_only() -> None:
    student, teacher = logits_pair()
    labels = torch.zeros(6, dtype=torch.long)
    loss, parts = DistillationLoss(alpha=1.0, temperature=2.0)(student, labels, teacher)
    assert set(parts) == {"loss", "kd"}
    assert loss.item() == pytest.approx(kd_reference(student, teacher, 2.0), rel=1e-5)


def test_mixed_weighting_and_parts() -> None:
    student, teacher = logits_pair()
    labels = torch.tensor([4, 3, 2, 1, 0, 1])
    student.requires_grad_(True)
    loss, parts = DistillationLoss(alpha=0.3, temperature=4.0)(student, labels, teacher)
    kd, ce = kd_reference(student.detach(), teacher, 4.0), F.cross_entropy(student.detach(), labels).item()
    assert float(parts["kd"]) == pytest.approx(kd, rel=1e-5) and float(parts["ce"]) == pytest.approx(ce, rel=1e-6)
    assert loss.item() == pytest.approx(0.3 * kd + 0.7 * ce, rel=1e-5)
    assert float(parts["loss"]) == pytest.approx(loss.item())
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_without_labels_kd_is_used_alone(alpha: float) -> None:
    student, teacher = logits_pair()
    loss, parts = DistillationLoss(alpha=alpha, temperature=2.0)(student, None, teacher)
    assert set(parts) == {"loss", "kd"}
    assert loss.item() == pytest.approx(kd_reference(student, teacher, 2.0), rel=1e-5)


def test_missing_teacher_logits_is_a_value_error() -> None:
    student, _ = logits_pair()
    with pytest.raises(ValueError, match="needs teacher_logits .alpha=0.5"):
        DistillationLoss(alpha=0.5, temperature=1.0)(student, torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match="needs teacher_logits .labels is None"):
        DistillationLoss(alpha=0.0, temperature=1.0)(student, None)


def identity_feature_loss(kind: str, weight: float = 1.0) -> DistillationLoss:
    loss = DistillationLoss(alpha=0.0, temperature=1.0, feature_loss=kind, feature_weight=weight,
                            student_dim=2, teacher_dim=2)
    assert isinstance(loss.projector, nn.Linear)
    with torch.no_grad():
        loss.projector.weight.copy_(torch.eye(2))
        loss.projector.bias.zero_()
    return loss


# raw features: normalising first would give mse 1.0 and smooth_l1 0.5 instead
@pytest.mark.parametrize(("kind", "expected"), [("cosine", 1.0), ("mse", 2.0), ("smooth_l1", 0.75)])
def test_feature_losses_on_known_vectors(kind: str, expected: float) -> None:
    student_feats = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    teacher_feats = torch.tensor([[3.0, 0.0], [0.0, -1.0]])  # cosine similarities 1 and -1
    logits, labels = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 0])
    loss, parts = identity_feature_loss(kind, weight=0.5)(logits, labels, None, student_feats, teacher_feats)
    assert float(parts["feature"]) == pytest.approx(expected, rel=1e-6)
    assert loss.item() == pytest.approx(F.cross_entropy(logits, labels).item() + 0.5 * expected, rel=1e-6)


def test_projector_only_when_needed_and_trainable() -> None:
    plain = DistillationLoss(alpha=0.5, temperature=2.0)
    assert plain.projector is None and list(plain.parameters()) == []
    linear = DistillationLoss(alpha=0.5, temperature=2.0, feature_loss="cosine", feature_weight=1.0,
                              student_dim=3, teacher_dim=5)
    assert isinstance(linear.projector, nn.Linear) and linear.projector.weight.shape == (5, 3)
    mlp = DistillationLoss(alpha=0.5, temperature=2.0, feature_loss="mse", feature_weight=1.0,
                           student_dim=3, teacher_dim=5, projector_hidden=7)
    assert isinstance(mlp.projector, nn.Sequential)
    assert [type(m) for m in mlp.projector] == [nn.Linear, nn.GELU, nn.Linear]
    assert [p.shape for p in mlp.parameters()] == [(7, 3), (7,), (5, 7), (5,)]
    assert all(key.startswith("projector.") for key in mlp.state_dict())
    student, teacher = logits_pair(batch=4)
    loss, _ = mlp(student, torch.zeros(4, dtype=torch.long), teacher, torch.randn(4, 3), torch.randn(4, 5))
    loss.backward()
    assert all(p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0 for p in mlp.parameters())


def test_missing_or_misshapen_features_are_value_errors() -> None:
    loss = identity_feature_loss("cosine")
    logits, labels = torch.zeros(2, 2), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="needs teacher_features; pass both"):
        loss(logits, labels, None, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="needs student_features and teacher_features"):
        loss(logits, labels)
    with pytest.raises(ValueError, match=r"student_features must be \[B, 2\], got \[2, 3\]"):
        loss(logits, labels, None, torch.zeros(2, 3), torch.zeros(2, 2))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"alpha": -0.1, "temperature": 1.0}, r"`alpha` must be in \[0, 1\], got -0.1"),
    ({"alpha": 1.5, "temperature": 1.0}, r"`alpha` must be in \[0, 1\], got 1.5"),
    ({"alpha": 0.5, "temperature": 0.0}, "`temperature` must be positive, got 0.0"),
    ({"alpha": 0.5, "temperature": 1.0, "feature_weight": -1.0}, "`feature_weight` must be non-negative"),
    ({"alpha": 0.5, "temperature": 1.0, "feature_loss": "l2"},
     "unknown distillation `feature_loss` 'l2'; use one of `none`, `cosine`, `smooth_l1`, `mse`"),
    ({"alpha": 0.5, "temperature": 1.0, "feature_loss": "mse", "student_dim": 4},
     "needs the feature sizes, got student_dim=4, teacher_dim=0"),
    ({"alpha": 0.5, "temperature": 1.0, "projector_hidden": -2}, "`projector_hidden` must be non-negative"),
])
def test_bad_settings_are_config_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        DistillationLoss(**kwargs)


def test_metrics_on_hand_made_batches() -> None:
    student = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 0.5]])  # argmax 0, 1, 0
    teacher = torch.tensor([[0.0, 1.0, 0.0], [0.0, 5.0, 1.0], [3.0, 0.0, 0.0]])  # argmax 1, 1, 0
    assert top1(student, torch.tensor([0, 2, 0])) == pytest.approx(2 / 3)
    assert top1(student, torch.tensor([0, 1, 0])) == pytest.approx(1.0)
    assert agreement(student, teacher) == pytest.approx(2 / 3)
    assert agreement(teacher, teacher) == pytest.approx(1.0)
    # p_teacher = (0.75, 0.25), p_student = (0.5, 0.5)
    two_class = kl_to_teacher(torch.zeros(1, 2), torch.tensor([[math.log(3.0), 0.0]]))
    assert two_class == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), rel=1e-6)
    assert isinstance(two_class, float) and kl_to_teacher(teacher, teacher) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="non-empty batch"):
        top1(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))


def test_unlabeled_samples_get_no_label_term() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(6, 5), torch.randn(6, 5)
    labels = torch.tensor([1, -1, 3, -1, -1, 0])
    loss = DistillationLoss(alpha=0.5, temperature=2.0)
    _, parts = loss(s, labels, teacher_logits=t)
    keep = labels >= 0
    assert float(parts["ce"]) == pytest.approx(F.cross_entropy(s[keep], labels[keep]).item(), rel=1e-6)
    total, parts = loss(s, torch.full((6,), -1), teacher_logits=t)  # a batch with no label at all
    assert float(parts["ce"]) == 0.0 and torch.isfinite(total)
    assert total.item() == pytest.approx(0.5 * kd_kl(s, t, 2.0).item(), rel=1e-6)
