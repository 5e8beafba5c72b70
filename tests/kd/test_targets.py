"""Sparse top-k teacher logits: exact where stored, the tail rebuilt as documented, KD identical when k = C."""

from __future__ import annotations

import pytest
import torch

from shardstore.errors import ConfigError
from shardstore.kd.losses import kd_kl, kd_kl_from_log_probs
from shardstore.kd.targets import encode_topk, index_dtype, teacher_log_probs


def logits(n: int = 16, classes: int = 100, sharp: float = 4.0) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(n, classes) * sharp


def test_topk_probabilities_and_tail_mass_are_exact_at_temperature_one() -> None:
    z = logits()
    dense = torch.softmax(z, -1)
    sparse = encode_topk(z, 10)
    rebuilt = teacher_log_probs(sparse).exp()
    top = sparse.indices.long()
    # the kept classes: exact up to float16 storage of the logits (float16 log-probs: ~0.2% at log p ~ -5)
    torch.testing.assert_close(rebuilt.gather(-1, top), dense.gather(-1, top), rtol=3e-3, atol=1e-5)
    # the tail: the true remaining mass, shared equally
    tail_true = 1 - dense.gather(-1, top).sum(-1)
    mask = torch.ones_like(dense, dtype=torch.bool).scatter_(-1, top, False)
    tail = rebuilt.masked_select(mask).view(z.shape[0], -1)
    torch.testing.assert_close(tail.sum(-1), tail_true, rtol=2e-3, atol=1e-7)
    assert torch.allclose(tail, tail[:, :1].expand_as(tail))
    torch.testing.assert_close(rebuilt.sum(-1), torch.ones(z.shape[0]))  # log_softmax renormalises the rounding


def test_all_classes_kept_is_exact_at_any_temperature() -> None:
    z = logits(classes=12)
    sparse = encode_topk(z, 12)
    for t in (1.0, 2.0, 4.0):
        torch.testing.assert_close(teacher_log_probs(sparse, t).exp(), torch.softmax(z / t, -1),
                                   rtol=2e-3, atol=1e-6)
        student = torch.randn(16, 12)
        torch.testing.assert_close(kd_kl_from_log_probs(student, teacher_log_probs(sparse, t), t),
                                   kd_kl(student, z, t), rtol=5e-3, atol=1e-5)


def test_renormalise_drops_the_tail_and_sparse_kd_is_close_for_a_confident_teacher() -> None:
    z = logits(sharp=1.0)
    z[torch.arange(z.shape[0]), torch.arange(z.shape[0]) % 7] += 8.0  # one clear class per view
    sparse = encode_topk(z, 10)
    renorm = teacher_log_probs(sparse, tail="renormalise").exp()
    assert int((renorm > 0).sum(-1).max()) == 10
    torch.testing.assert_close(renorm.sum(-1), torch.ones(z.shape[0]))
    student = torch.randn_like(z)
    # At T = 1 only the tail's shape is missing (its mass is kept): a few percent for a confident teacher.
    dense_kd = kd_kl(student, z, 1.0)
    sparse_kd = kd_kl_from_log_probs(student, teacher_log_probs(sparse, 1.0), 1.0)
    assert abs(sparse_kd.item() - dense_kd.item()) / dense_kd.item() < 0.05
    # A high temperature lifts the tail, whose shape was not stored: the error grows (documented).
    hot = kd_kl_from_log_probs(student, teacher_log_probs(sparse, 4.0), 4.0)
    assert abs(hot.item() - kd_kl(student, z, 4.0).item()) > abs(sparse_kd.item() - dense_kd.item())


def test_storage_types_and_errors() -> None:
    assert index_dtype(1000) == torch.int16 and index_dtype(40_000) == torch.int32
    sparse = encode_topk(logits(classes=1000), 5)
    assert sparse.indices.dtype == torch.int16 and sparse.log_probs.dtype == torch.float16
    assert sparse.indices.shape == sparse.log_probs.shape == (16, 5) and sparse.tail_log_mass.shape == (16,)
    assert torch.isinf(encode_topk(logits(classes=7), 7).tail_log_mass).all()
    with pytest.raises(ConfigError, match="top-k must be between 1 and the 1000 classes, got k=0"):
        encode_topk(logits(classes=1000), 0)
    with pytest.raises(ConfigError, match="unknown tail 'flat'; choose from spread, renormalise"):
        teacher_log_probs(sparse, tail="flat")
