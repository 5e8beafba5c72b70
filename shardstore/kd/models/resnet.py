"""Pure-torch convolutional networks: the ResNet family (CIFAR and ImageNet style) and a small 4-layer CNN."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from shardstore.errors import ConfigError

# depth -> blocks per stage. CIFAR style has 3 stages of BasicBlocks ((depth - 2) / 6 blocks each).
CIFAR_DEPTHS: dict[int, tuple[int, int, int]] = {
    8: (1, 1, 1), 14: (2, 2, 2), 20: (3, 3, 3), 32: (5, 5, 5), 44: (7, 7, 7), 56: (9, 9, 9), 110: (18, 18, 18),
}
# ImageNet style has 4 stages; depth 50 and up use Bottleneck blocks.
IMAGENET_DEPTHS: dict[int, tuple[int, int, int, int]] = {
    18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3),
}


def _conv_bn(in_ch: int, out_ch: int, kernel: int, stride: int) -> list[nn.Module]:
    """A bias-free convolution ("same" padding) followed by batch norm."""
    return [nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False), nn.BatchNorm2d(out_ch)]


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity (or 1x1 projection) shortcut."""

    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int) -> None:
        super().__init__()
        out_ch = width * self.expansion
        self.conv1, self.bn1 = _conv_bn(in_ch, width, 3, stride)
        self.conv2, self.bn2 = _conv_bn(width, out_ch, 3, 1)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential(*_conv_bn(in_ch, out_ch, 1, stride)) if stride != 1 or in_ch != out_ch else None

    def last_bn(self) -> nn.BatchNorm2d:
        """The batch norm that closes the residual branch (its gamma starts at zero)."""
        return self.bn2

    def forward(self, x: Tensor) -> Tensor:
        """Residual branch plus shortcut, then ReLU."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.shortcut is None else self.shortcut(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride, as in torchvision's v1.5), 1x1 expand by 4, with a shortcut."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int) -> None:
        super().__init__()
        out_ch = width * self.expansion
        self.conv1, self.bn1 = _conv_bn(in_ch, width, 1, 1)
        self.conv2, self.bn2 = _conv_bn(width, width, 3, stride)
        self.conv3, self.bn3 = _conv_bn(width, out_ch, 1, 1)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential(*_conv_bn(in_ch, out_ch, 1, stride)) if stride != 1 or in_ch != out_ch else None

    def last_bn(self) -> nn.BatchNorm2d:
        """The batch norm that closes the residual branch (its gamma starts at zero)."""
        return self.bn3

    def forward(self, x: Tensor) -> Tensor:
        """Residual branch plus shortcut, then ReLU."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.shortcut is None else self.shortcut(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    """A stem, residual stages, global average pooling and a linear classifier."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        stage_blocks: tuple[int, ...],
        num_classes: int,
        *,
        width: int,
        stem: nn.Module,
    ) -> None:
        super().__init__()
        self.stem = stem
        stages: list[nn.Module] = []
        in_ch = width
        for i, count in enumerate(stage_blocks):
            stage_width = width * 2**i
            blocks: list[nn.Module] = []
            for j in range(count):
                blocks.append(block(in_ch, stage_width, 2 if (i > 0 and j == 0) else 1))
                in_ch = stage_width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features: int = in_ch
        self.fc = nn.Linear(in_ch, num_classes)
        _init_weights(self)

    def forward_features(self, x: Tensor) -> Tensor:
        """The globally average-pooled embedding, [B, num_features]."""
        return torch.flatten(self.pool(self.stages(self.stem(x))), 1)

    def forward_head(self, features: Tensor) -> Tensor:
        """Logits from the pooled embedding."""
        return self.fc(features)

    def forward(self, x: Tensor) -> Tensor:
        """Logits [B, num_classes] from a normalised batch [B, C, H, W]."""
        return self.forward_head(self.forward_features(x))


def _init_weights(model: nn.Module) -> None:
    """Kaiming-normal convolutions, unit BN, and a zero gamma on the last BN of every residual branch."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for m in model.modules():
        if isinstance(m, (BasicBlock, Bottleneck)):
            # each block starts as the identity, which helps deep nets train early on (Goyal et al. 2017)
            nn.init.zeros_(m.last_bn().weight)


def resnet(depth: int, num_classes: int, *, width: int = 64, small_input: bool = False, in_chans: int = 3) -> ResNet:
    """Build a ResNet: depths 8/14/20/32/44/56/110 are CIFAR style (3x3 stem, 3 stages of width, 2*width and
    4*width; `small_input` has no effect), 18/34 (BasicBlock) and 50/101/152 (Bottleneck) are ImageNet style
    (4 stages; a 7x7 stride-2 stem and max pool, or a 3x3 stride-1 stem without pool when `small_input`)."""
    if num_classes < 1 or width < 1 or in_chans < 1:
        raise ConfigError(
            f"resnet{depth}: num_classes={num_classes}, width={width}, in_chans={in_chans}; all must be at least 1"
        )
    if depth in CIFAR_DEPTHS:
        stem = nn.Sequential(*_conv_bn(in_chans, width, 3, 1), nn.ReLU(inplace=True))
        return ResNet(BasicBlock, CIFAR_DEPTHS[depth], num_classes, width=width, stem=stem)
    if depth in IMAGENET_DEPTHS:
        if small_input:
            stem = nn.Sequential(*_conv_bn(in_chans, width, 3, 1), nn.ReLU(inplace=True))
        else:
            stem = nn.Sequential(
                *_conv_bn(in_chans, width, 7, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2, padding=1)
            )
        block = Bottleneck if depth >= 50 else BasicBlock
        return ResNet(block, IMAGENET_DEPTHS[depth], num_classes, width=width, stem=stem)
    valid = ", ".join(str(d) for d in sorted({*CIFAR_DEPTHS, *IMAGENET_DEPTHS}))
    raise ConfigError(f"resnet depth {depth} is not built in; use one of {valid}")


class SmallCNN(nn.Module):
    """Four 3x3 conv + BN + ReLU layers (width, 2w, 4w, 4w; stride 2 on the 2nd and 3rd), global pooling, linear
    head: a fast student for 8x8 to 32x32 inputs."""

    def __init__(self, num_classes: int, *, width: int = 32, in_chans: int = 3) -> None:
        super().__init__()
        if num_classes < 1 or width < 1 or in_chans < 1:
            raise ConfigError(
                f"cnn_small: num_classes={num_classes}, width={width}, in_chans={in_chans}; all must be at least 1"
            )
        channels = (width, 2 * width, 4 * width, 4 * width)
        strides = (1, 2, 2, 1)
        layers: list[nn.Module] = []
        in_ch = in_chans
        for out_ch, stride in zip(channels, strides):
            layers += [*_conv_bn(in_ch, out_ch, 3, stride), nn.ReLU(inplace=True)]
            in_ch = out_ch
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features: int = in_ch
        self.fc = nn.Linear(in_ch, num_classes)
        _init_weights(self)

    def forward_features(self, x: Tensor) -> Tensor:
        """The globally average-pooled embedding, [B, num_features]."""
        return torch.flatten(self.pool(self.features(x)), 1)

    def forward_head(self, features: Tensor) -> Tensor:
        """Logits from the pooled embedding."""
        return self.fc(features)

    def forward(self, x: Tensor) -> Tensor:
        """Logits [B, num_classes] from a normalised batch [B, C, H, W]."""
        return self.forward_head(self.forward_features(x))
