"""kd_kl_from_log_probs (teacher given as log-probabilities at T) equals kd_kl on the logits, T² scale included."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shardstore.kd.losses import kd_kl, kd_kl_from_log_probs


@pytest.mark.parametrize("temperature", [2.0, 4.0])
def test_from_log_probs_matches_kd_kl(temperature: float) -> None:
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(5, 7, generator=gen)
    teacher = torch.randn(5, 7, generator=gen) * 3
    want = kd_kl(student, teacher, temperature)
    got = kd_kl_from_log_probs(student, F.log_softmax(teacher / temperature, dim=-1), temperature)
    assert want.item() > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
