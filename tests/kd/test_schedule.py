"""Training helpers: the linear lr scaling rule, warmup-cosine per optimizer update, and the EMA of weights."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from shardstore.errors import ConfigError
from shardstore.kd.ema import ModelEma
from shardstore.kd.schedule import scaled_lr, warmup_cosine

BASE_LR = 0.1


def lr_sequence(updates: int, **kwargs: float) -> list[float]:
    """The lr each of ``updates`` optimizer updates runs at, stepping the scheduler after each."""
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=BASE_LR)
    scheduler = warmup_cosine(optimizer, **kwargs)  # type: ignore[arg-type]
    lrs = []
    for _ in range(updates):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_warmup_then_cosine_at_key_updates() -> None:
    lrs = lr_sequence(14, total_steps=11, warmup_steps=3, min_lr_ratio=0.1)
    assert lrs[:4] == pytest.approx([BASE_LR / 3, 2 * BASE_LR / 3, BASE_LR, BASE_LR])
    assert lrs[7] == pytest.approx(BASE_LR * (0.1 + 0.9 * 0.5))  # half way through the 8 decay updates
    assert lrs[5] == pytest.approx(BASE_LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 2 / 8))))
    assert lrs[11:] == pytest.approx([BASE_LR * 0.1] * 3)  # reached at total_steps, then held
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))


def test_no_warmup_and_all_warmup() -> None:
    cosine = [BASE_LR * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]  # 1, 0.854, 0.5, 0.146
    assert lr_sequence(6, total_steps=4, warmup_steps=0) == pytest.approx(cosine + [0.0, 0.0])
    assert lr_sequence(6, total_steps=4, warmup_steps=4, min_lr_ratio=0.5) == pytest.approx(
        [BASE_LR / 4, BASE_LR / 2, BASE_LR * 3 / 4, BASE_LR, BASE_LR / 2, BASE_LR / 2])


def test_resumed_scheduler_continues_the_curve() -> None:
    params = [nn.Parameter(torch.zeros(2))]
    optimizer = torch.optim.SGD(params, lr=BASE_LR)
    scheduler = warmup_cosine(optimizer, total_steps=10, warmup_steps=2)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    resumed_opt = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=BASE_LR)
    resumed = warmup_cosine(resumed_opt, total_steps=10, warmup_steps=2)
    resumed_opt.load_state_dict(optimizer.state_dict())
    resumed.load_state_dict(scheduler.state_dict())
    assert resumed_opt.param_groups[0]["lr"] == pytest.approx(lr_sequence(6, total_steps=10, warmup_steps=2)[5])
    assert resumed_opt.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]


def test_scaled_lr_is_linear_in_the_batch() -> None:
    assert scaled_lr(0.1, global_batch=1024, base_batch=256) == pytest.approx(0.4)
    assert scaled_lr(3e-4, global_batch=64, base_batch=512) == pytest.approx(3e-4 / 8)
    with pytest.raises(ConfigError, match="batch sizes for lr scaling must be at least 1, got global_batch=0"):
        scaled_lr(0.1, global_batch=0, base_batch=256)
    with pytest.raises(ConfigError, match="base learning rate must be positive, got -0.1"):
        scaled_lr(-0.1, global_batch=8, base_batch=8)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"total_steps": 0, "warmup_steps": 0}, "`total_steps` must be at least 1, got 0"),
    ({"total_steps": 5, "warmup_steps": -1}, r"`warmup_steps` must be in \[0, total_steps=5\], got -1"),
    ({"total_steps": 5, "warmup_steps": 6}, r"`warmup_steps` must be in \[0, total_steps=5\], got 6"),
    ({"total_steps": 5, "warmup_steps": 1, "min_lr_ratio": 1.5}, r"`min_lr_ratio` must be in \[0, 1\], got 1.5"),
])
def test_schedule_errors(kwargs: dict, match: str) -> None:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=BASE_LR)
    with pytest.raises(ConfigError, match=match):
        warmup_cosine(optimizer, **kwargs)


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def perturb(model: nn.Module, seed: int) -> None:
    """Move the weights and, through a training-mode forward, the BatchNorm running statistics."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen))
        model.train()
        model(torch.randn(8, 3, generator=gen))


def float_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if v.is_floating_point()}


def test_ema_follows_the_formula_over_weights_and_buffers() -> None:
    decay = 0.9
    model = small_model()
    ema = ModelEma(model, decay)
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())
    manual: dict[str, torch.Tensor] = {}
    for update in range(4):
        perturb(model, seed=update)
        ema.update(model)
        current = float_state(model)
        # the first update copies the model, later ones average
        manual = current if update == 0 else {k: decay * manual[k] + (1 - decay) * current[k] for k in current}
    got = float_state(ema.module)
    assert set(got) == set(manual) and "1.running_mean" in got
    for key in manual:
        torch.testing.assert_close(got[key], manual[key], rtol=1e-6, atol=1e-6)
        assert not torch.allclose(got[key], float_state(model)[key])
    assert ema.num_updates == 4 and not ema.module.training


def test_ema_state_dict_round_trip() -> None:
    model = small_model()
    ema = ModelEma(model, 0.99)
    for update in range(3):
        perturb(model, seed=10 + update)
        ema.update(model)
    restored = ModelEma(small_model(), 0.99)
    restored.load_state_dict(ema.state_dict())
    assert restored.num_updates == 3
    for key, value in float_state(ema.module).items():
        assert torch.equal(float_state(restored.module)[key], value)
    perturb(model, seed=20)
    ema.update(model)
    restored.update(model)  # averages (not copies): the update count came back too
    for key, value in float_state(ema.module).items():
        assert torch.equal(float_state(restored.module)[key], value)


@pytest.mark.parametrize("decay", [0.0, 1.0, 1.5])
def test_ema_decay_outside_open_interval_is_a_config_error(decay: float) -> None:
    with pytest.raises(ConfigError, match=rf"EMA `decay` must be in \(0, 1\), got {decay}"):
        ModelEma(small_model(), decay)
