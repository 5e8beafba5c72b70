"""The model registry, the model contract, the input adapter and checkpoint / TorchScript loading."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shardstore.errors import ConfigError
from shardstore.kd.models import (
    MODELS,
    InputAdapter,
    build_model,
    freeze,
    load_checkpoint_into,
    load_torchscript,
    resnet,
    vit,
)
from shardstore.kd.models import io as model_io
from shardstore.kd.models.resnet import BasicBlock, Bottleneck

# TorchScript is deprecated in recent torch; it stays supported here for teachers exported that way.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")

EXPECTED_FEATURES = {  # the contract's names and their embedding sizes at default settings
    "resnet8": 64, "resnet14": 64, "resnet20": 64, "resnet18": 512, "resnet34": 512, "resnet50": 2048,
    "vit_tiny": 192, "vit_small": 384, "vit_micro": 64, "cnn_small": 128,
}


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """These models are tiny: one intra-op thread is as fast, and does not spin against other work on the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_build(name: str, num_classes: int = 10) -> tuple[nn.Module, int]:
    """A registry model at a small image size (8 for cnn_small, 32 otherwise; ViTs with 4x4 patches)."""
    size = 8 if name == "cnn_small" else 32
    kwargs: dict[str, Any] = {"patch_size": 4} if name.startswith("vit") else {}
    return build_model(name, num_classes, image_size=size, **kwargs), size


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_has_the_contract_names() -> None:
    assert set(MODELS) == set(EXPECTED_FEATURES)


#: the registry's largest models: building them takes most of this file's time, so they run with -m slow
LARGE = {"resnet34", "resnet50", "vit_small"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in LARGE else n
                                  for n in sorted(EXPECTED_FEATURES)])
def test_every_model_satisfies_the_contract(name: str) -> None:
    torch.manual_seed(0)
    model, size = small_build(name)
    model.eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        logits = model(x)
        features = model.forward_features(x)
        again = model.forward_head(features)
    assert logits.shape == (2, 10)
    assert features.shape == (2, model.num_features)
    assert model.num_features == EXPECTED_FEATURES[name]
    torch.testing.assert_close(logits, again)
    assert logits.std() > 0  # not a constant output


@pytest.mark.parametrize(("name", "expected"), [("resnet18", 11_689_512),
                                                pytest.param("resnet50", 25_557_032, marks=pytest.mark.slow)])
def test_imagenet_resnet_parameter_counts(name: str, expected: int) -> None:
    assert num_params(build_model(name, 1000, image_size=224)) == expected


def test_resnet_in_chans_width_and_cifar_stages() -> None:
    model = resnet(20, 5, width=8, in_chans=1)
    assert model.num_features == 32  # 3 stages: 8, 16, 32
    assert [len(stage) for stage in model.stages] == [3, 3, 3]
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 5)


def test_residual_blocks_start_with_zero_gamma_and_kaiming_convs() -> None:
    model = resnet(50, 10)
    blocks = [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]
    assert len(blocks) == 16
    assert all(torch.count_nonzero(b.last_bn().weight) == 0 for b in blocks)
    assert torch.all(blocks[0].bn1.weight == 1)
    conv = blocks[0].conv3  # 1x1, 64 -> 256; kaiming normal, fan_out: std = sqrt(2 / out_channels)
    expected_std = (2.0 / conv.out_channels) ** 0.5
    assert abs(conv.weight.std().item() - expected_std) / expected_std < 0.1


@pytest.mark.slow  # over 0.3 s
def test_small_input_stem_keeps_resolution() -> None:
    big = resnet(18, 10)
    small = resnet(18, 10, small_input=True)
    assert any(isinstance(m, nn.MaxPool2d) for m in big.stem)
    assert not any(isinstance(m, nn.MaxPool2d) for m in small.stem)
    x = torch.randn(1, 3, 32, 32)
    assert big.stem(x).shape[-1] == 8
    assert small.stem(x).shape[-1] == 32
    assert build_model("resnet18", 10, image_size=32, small_input=True).stem[0].kernel_size == (3, 3)


def test_unknown_resnet_depth() -> None:
    with pytest.raises(ConfigError, match=r"resnet depth 19 is not built in; use one of 8, 14, 18, 20"):
        resnet(19, 10)


def test_vit_checks_its_geometry() -> None:
    with pytest.raises(ConfigError, match=r"image_size 30 is not a multiple of patch_size 4; choose a patch_size"):
        vit(10, image_size=30, patch_size=4, dim=32, depth=1, heads=2)
    with pytest.raises(ConfigError, match=r"dim 30 is not divisible by heads 4"):
        vit(10, image_size=32, patch_size=4, dim=30, depth=1, heads=4)
    with pytest.raises(ConfigError, match=r"pool 'max' is not known; use one of cls, mean"):
        vit(10, image_size=32, patch_size=4, dim=32, depth=1, heads=2, pool="max")
    model = vit(10, image_size=16, patch_size=4, dim=32, depth=1, heads=2)
    with pytest.raises(ConfigError, match=r"vit expects \[B, 3, 16, 16\] inputs, got \[1, 3, 32, 32\]"):
        model(torch.randn(1, 3, 32, 32))


def test_vit_mean_pool_differs_from_cls_pool() -> None:
    torch.manual_seed(0)
    cls = vit(10, image_size=16, patch_size=4, dim=32, depth=2, heads=2).eval()
    mean = vit(10, image_size=16, patch_size=4, dim=32, depth=2, heads=2, pool="mean").eval()
    mean.load_state_dict(cls.state_dict())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert not torch.allclose(cls.forward_features(x), mean.forward_features(x))


def test_vit_presets_and_overrides() -> None:
    tiny = build_model("vit_tiny", 10, image_size=32, patch_size=8)
    assert tiny.num_features == 192 and len(tiny.blocks) == 12 and tiny.blocks[0].attn.heads == 3
    small = build_model("vit_small", 10, image_size=32, patch_size=8, depth=2)
    assert small.num_features == 384 and len(small.blocks) == 2 and small.blocks[0].attn.heads == 6


def test_unknown_name_suggests_the_closest() -> None:
    with pytest.raises(ConfigError, match=r"unknown model 'resnt50'; did you mean 'resnet50'\? valid names: resnet8, "):
        build_model("resnt50", 10, image_size=32)


def test_bad_kwarg_names_model_and_argument() -> None:
    with pytest.raises(ConfigError, match=r"model 'resnet18' does not take the argument 'widht'"):
        build_model("resnet18", 10, image_size=32, widht=8)
    with pytest.raises(ConfigError, match=r"model 'vit_micro' does not take the argument 'dropout'"):
        build_model("vit_micro", 10, image_size=32, dropout=0.1)


def test_timm_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # makes `import timm` raise ImportError
    msg = r"model 'timm:resnet18' needs timm; install it with pip install timm \(or shardstore\[timm\]\)"
    with pytest.raises(ConfigError, match=msg):
        build_model("timm:resnet18", 10, image_size=32)


class FakeTimmNet(nn.Module):
    """Stands in for a timm model: forward_features gives a map, forward_head pools (pre_logits) then classifies."""

    def __init__(self, num_classes: int, in_chans: int) -> None:
        super().__init__()
        self.num_features = 6
        self.conv = nn.Conv2d(in_chans, 6, 3, padding=1)
        self.fc = nn.Linear(6, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.conv(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        pooled = x.mean(dim=(2, 3))
        return pooled if pre_logits else self.fc(pooled)

    def get_classifier(self) -> nn.Module:
        return self.fc


def test_timm_models_are_wrapped_to_the_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, dict[str, Any]]] = []

    def create_model(name: str, **kwargs: Any) -> nn.Module:
        calls.append((name, kwargs))
        return FakeTimmNet(kwargs["num_classes"], kwargs["in_chans"])

    fake = types.ModuleType("timm")
    fake.create_model = create_model  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "timm", fake)
    model = build_model("timm:fake_net", 7, image_size=32, in_chans=1, drop_rate=0.1)
    assert calls == [("fake_net", {"num_classes": 7, "pretrained": False, "in_chans": 1, "drop_rate": 0.1})]
    x = torch.randn(2, 1, 8, 8)
    features = model.forward_features(x)
    assert model.num_features == 6 and features.shape == (2, 6)
    torch.testing.assert_close(features, model.model.conv(x).mean(dim=(2, 3)))
    torch.testing.assert_close(model(x), model.model.fc(features))


def test_unknown_timm_model_suggests_the_closest(monkeypatch: pytest.MonkeyPatch) -> None:
    def create_model(name: str, **kwargs: Any) -> nn.Module:
        raise RuntimeError(f"Unknown model ({name})")

    fake = types.ModuleType("timm")
    fake.create_model = create_model  # type: ignore[attr-defined]
    fake.list_models = lambda: ["resnet18", "vit_tiny_patch16_224"]  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "timm", fake)
    msg = r"model 'timm:resnet81': timm has no such model; did you mean 'timm:resnet18'\? see timm.list_models\(\)"
    with pytest.raises(ConfigError, match=msg):
        build_model("timm:resnet81", 10, image_size=32)


def test_input_adapter_resizes_and_normalises() -> None:
    torch.manual_seed(0)
    inner = build_model("cnn_small", 10, image_size=16).eval()
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    adapter = InputAdapter(inner, size=16, mean=mean, std=std).eval()
    x = torch.rand(2, 3, 24, 20)
    resized = F.interpolate(x, size=(16, 16), mode="bilinear", antialias=True, align_corners=False)
    manual = (resized - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(adapter(x), inner(manual))
        torch.testing.assert_close(adapter.forward_features(x), inner.forward_features(manual))
        features = adapter.forward_features(x)
        torch.testing.assert_close(adapter.forward_head(features), inner.forward_head(features))
    assert adapter.num_features == inner.num_features and adapter.model is inner
    # mean/std are buffers, not parameters, and stay out of the state dict
    assert num_params(adapter) == num_params(inner)
    assert set(adapter.state_dict()) == {f"model.{k}" for k in inner.state_dict()}


def test_input_adapter_resizes_only_when_needed(monkeypatch: pytest.MonkeyPatch) -> None:
    sizes: list[tuple[int, ...]] = []
    real = F.interpolate

    def spy(x: Tensor, **kwargs: Any) -> Tensor:
        sizes.append(tuple(x.shape[-2:]))
        return real(x, **kwargs)

    monkeypatch.setattr(model_io.F, "interpolate", spy)
    adapter = InputAdapter(build_model("cnn_small", 10, image_size=8).eval(), size=8, mean=[0.5] * 3, std=[0.5] * 3)
    adapter(torch.rand(1, 3, 8, 8))
    assert sizes == []
    adapter(torch.rand(1, 3, 12, 12))
    assert sizes == [(12, 12)]


def test_input_adapter_rejects_bad_settings_and_batches() -> None:
    inner = build_model("cnn_small", 10, image_size=8)
    with pytest.raises(ConfigError, match=r"mean has 3 values and std 2; give one of each per channel"):
        InputAdapter(inner, size=8, mean=[0.5] * 3, std=[0.5] * 2)
    with pytest.raises(ConfigError, match=r"std \[0.5, 0.0, 0.5\] has a value <= 0"):
        InputAdapter(inner, size=8, mean=[0.5] * 3, std=[0.5, 0.0, 0.5])
    adapter = InputAdapter(inner, size=8, mean=[0.5] * 3, std=[0.5] * 3)
    with pytest.raises(ConfigError, match=r"shape \[1, 1, 8, 8\], expected \[B, 3, H, W\]"):
        adapter(torch.rand(1, 1, 8, 8))
    with pytest.raises(TypeError, match=r"expects a float batch in \[0, 1\], got torch.uint8"):
        adapter(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))


def test_freeze() -> None:
    model = build_model("cnn_small", 10, image_size=8)
    assert model.training
    assert freeze(model) is model
    assert not model.training and not any(m.training for m in model.modules())
    assert all(not p.requires_grad for p in model.parameters())


def pair(name: str = "resnet8") -> tuple[nn.Module, nn.Module]:
    """Two models of one architecture with different weights (BN statistics randomised too)."""
    torch.manual_seed(1)
    a = build_model(name, 10, image_size=8)
    torch.manual_seed(2)
    b = build_model(name, 10, image_size=8)
    with torch.no_grad():
        for m in a.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.weight.uniform_(0.5, 1.5)
    return a.eval(), b.eval()


@pytest.mark.parametrize(
    "wrap", ["plain", "module.", "_orig_mod.", "module._orig_mod.", "student", "student+module.", "student+adapter"]
)
def test_state_dict_round_trip(tmp_path: Path, wrap: str) -> None:
    src, dst = pair()
    state: dict[str, Any] = dict(src.state_dict())
    if wrap.endswith("adapter"):  # as the trainer saves its student: the model inside an InputAdapter
        state = dict(InputAdapter(src, size=8, mean=[0.5] * 3, std=[0.5] * 3).state_dict())
        assert all(k.startswith("model.") for k in state)
    elif "." in wrap:
        state = {wrap.split("+")[-1] + k: v for k, v in state.items()}
    if wrap.startswith("student"):
        state = {"epoch": 3, "student": state, "ema": None}
    torch.save(state, tmp_path / "ckpt.pt")
    x = torch.randn(2, 3, 8, 8)
    assert not torch.allclose(src(x), dst(x))
    assert load_checkpoint_into(dst, tmp_path / "ckpt.pt") is dst
    for (k, v), (k2, v2) in zip(src.state_dict().items(), dst.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    torch.testing.assert_close(src(x), dst(x))


def test_wrapped_checkpoint_loads_into_a_wrapper(tmp_path: Path) -> None:
    src, dst = pair("cnn_small")
    adapters = [InputAdapter(m, size=8, mean=[0.5] * 3, std=[0.5] * 3) for m in (src, dst)]
    torch.save({"module." + k: v for k, v in adapters[0].state_dict().items()}, tmp_path / "ckpt.pt")
    load_checkpoint_into(adapters[1], tmp_path / "ckpt.pt")
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(adapters[0](x), adapters[1](x))


def test_checkpoint_key_picks_the_entry(tmp_path: Path) -> None:
    src, dst = pair("cnn_small")
    torch.save({"model": dst.state_dict(), "ema": src.state_dict()}, tmp_path / "ckpt.pt")
    load_checkpoint_into(dst, tmp_path / "ckpt.pt", key="ema")
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(src(x), dst(x))
    with pytest.raises(ConfigError, match=r"ckpt.pt: has no key 'teacher' \(top-level keys: model, ema\)"):
        load_checkpoint_into(dst, tmp_path / "ckpt.pt", key="teacher")
    _, fresh = pair("cnn_small")
    torch.save({"student": None, "ema": src.state_dict()}, tmp_path / "no_student.pt")  # entries left empty are skipped
    load_checkpoint_into(fresh, tmp_path / "no_student.pt")
    torch.testing.assert_close(src(x), fresh(x))
    with pytest.raises(ConfigError, match=r"no_student.pt: entry 'student' is a NoneType, not a state dict"):
        load_checkpoint_into(fresh, tmp_path / "no_student.pt", key="student")


def test_checkpoint_mismatch_names_file_and_keys(tmp_path: Path) -> None:
    torch.save(build_model("resnet8", 100, image_size=8).state_dict(), tmp_path / "hundred.pt")
    msg = r"hundred.pt: does not fit ResNet: shape mismatch fc.weight \(file \[100, 64\], model \[10, 64\]\), fc.bias"
    with pytest.raises(ConfigError, match=msg):
        load_checkpoint_into(build_model("resnet8", 10, image_size=8), tmp_path / "hundred.pt")
    torch.save(build_model("resnet14", 10, image_size=8).state_dict(), tmp_path / "deeper.pt")
    with pytest.raises(ConfigError, match=r"deeper.pt: does not fit ResNet: unexpected keys stages.0.1.conv1.weight, "
                       r"[^;]*\(\+\d+ more\); check that the model name"):
        load_checkpoint_into(build_model("resnet8", 10, image_size=8), tmp_path / "deeper.pt")
    deeper = InputAdapter(build_model("resnet14", 10, image_size=8), size=8, mean=[0.5] * 3, std=[0.5] * 3)
    torch.save({"module." + k: v for k, v in deeper.state_dict().items()}, tmp_path / "adapter.pt")
    adapter = InputAdapter(build_model("resnet8", 10, image_size=8), size=8, mean=[0.5] * 3, std=[0.5] * 3)
    with pytest.raises(ConfigError, match=r"adapter.pt: does not fit InputAdapter: unexpected keys model.stages.0.1."):
        load_checkpoint_into(adapter, tmp_path / "adapter.pt")
    with pytest.raises(ConfigError, match=r"deeper.pt: does not fit SmallCNN: missing keys features.0.weight, "):
        load_checkpoint_into(build_model("cnn_small", 10, image_size=8), tmp_path / "deeper.pt")


def test_checkpoint_files_that_are_not_state_dicts(tmp_path: Path) -> None:
    model = build_model("cnn_small", 10, image_size=8)
    torch.save(model, tmp_path / "whole.pt")
    msg = r"whole.pt: holds pickled Python objects .* save model.state_dict\(\) instead"
    with pytest.raises(ConfigError, match=msg):
        load_checkpoint_into(model, tmp_path / "whole.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"junk.pt: is not a readable torch.save file"):
        load_checkpoint_into(model, tmp_path / "junk.pt")
    torch.jit.save(torch.jit.script(model), tmp_path / "scripted.pt")
    msg = r"scripted.pt: is a TorchScript file, not a state dict; set checkpoint_format"
    with pytest.raises(ConfigError, match=msg):
        load_checkpoint_into(model, tmp_path / "scripted.pt")


def test_missing_files(tmp_path: Path) -> None:
    model = build_model("cnn_small", 10, image_size=8)
    with pytest.raises(ConfigError, match=r"nope.pt: no such file; check the checkpoint path"):
        load_checkpoint_into(model, tmp_path / "nope.pt")
    with pytest.raises(ConfigError, match=r"nope.pt: no such file; check the TorchScript path"):
        load_torchscript(tmp_path / "nope.pt")


def test_torchscript_round_trip(tmp_path: Path) -> None:
    model = resnet(8, 10, width=8).eval()
    torch.jit.save(torch.jit.script(model), tmp_path / "teacher.pt")
    loaded = load_torchscript(tmp_path / "teacher.pt")
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
        torch.testing.assert_close(loaded.forward_features(x), model.forward_features(x))
    assert loaded.num_features == 32


def test_torchscript_logits_only(tmp_path: Path) -> None:
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 4)).eval()
    torch.jit.save(torch.jit.trace(net, torch.randn(1, 3, 2, 2)), tmp_path / "traced.pt")
    loaded = load_torchscript(tmp_path / "traced.pt")
    x = torch.randn(5, 3, 2, 2)
    torch.testing.assert_close(loaded(x), net(x))
    msg = r"a TorchScript teacher gives logits only; feature distillation needs a state-dict teacher"
    with pytest.raises(ConfigError, match=msg):
        loaded.forward_features(x)
    with pytest.raises(ConfigError, match=msg):
        loaded.num_features
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ConfigError, match=r"junk.pt: cannot be loaded as TorchScript"):
        load_torchscript(tmp_path / "junk.pt")
