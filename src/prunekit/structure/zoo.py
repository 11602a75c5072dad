"""Small convolutional networks with the couplings structural pruning must handle, sized for 28×28 images.

- ``ResNetLike``: residual adds (a whole stage's channels are one group), strided 1×1 shortcuts.
- ``MobileNetV2Like``: inverted residuals with depthwise convolutions and squeeze-excitation gates.
- ``DenseNetLike``: concatenation (each layer's new channels are a group), a flatten into a Linear.

They train on Fashion-MNIST in minutes on a CPU (``prunekit.models.fashion_mnist``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv_bn(cin, cout, 3, stride)
        self.conv2 = _conv_bn(cout, cout, 3)
        self.shortcut = _conv_bn(cin, cout, 1, stride) if (stride != 1 or cin != cout) else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv2(F.relu(self.conv1(x))) + self.shortcut(x))


class ResNetLike(nn.Module):
    """A CIFAR-style ResNet: stem, three stages of basic blocks, global average pooling, a Linear."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, ...] = (16, 32, 64), blocks: tuple[int, ...] = (2, 2, 2),
                 in_channels: int = 1):
        super().__init__()
        self.stem = _conv_bn(in_channels, widths[0])
        layers = []
        cin = widths[0]
        for stage, (width, count) in enumerate(zip(widths, blocks)):
            for index in range(count):
                layers.append(BasicBlock(cin, width, 2 if (index == 0 and stage > 0) else 1))
                cin = width
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(F.relu(self.stem(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = x.mean((2, 3), keepdim=True)
        return x * F.hardsigmoid(self.expand(F.relu(self.reduce(scale))))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expansion: int = 4):
        super().__init__()
        hidden = cin * expansion
        self.expand = _conv_bn(cin, hidden, 1)
        self.depthwise = _conv_bn(hidden, hidden, 3, stride, groups=hidden)
        self.se = SqueezeExcite(hidden, max(4, hidden // 4))
        self.project = _conv_bn(hidden, cout, 1)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self.expand(x))
        y = self.se(F.relu6(self.depthwise(y)))
        y = self.project(y)
        return x + y if self.residual else y


class MobileNetV2Like(nn.Module):
    """MobileNetV2/EfficientNet-style: inverted residuals, depthwise convolutions, squeeze-excitation."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.stem = _conv_bn(in_channels, 16, 3, 1)
        self.blocks = nn.Sequential(InvertedResidual(16, 16, 1), InvertedResidual(16, 24, 2),
                                    InvertedResidual(24, 24, 1), InvertedResidual(24, 32, 2))
        self.head = _conv_bn(32, 64, 1)
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu6(self.stem(x)))
        x = F.relu6(self.head(x))
        return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv(F.relu(self.norm(x)))], dim=1)


class DenseNetLike(nn.Module):
    """Dense blocks (concatenation), a transition, and a flatten of a 2×2 map into the classifier."""

    def __init__(self, num_classes: int = 10, growth: int = 8, layers: int = 3, in_channels: int = 1):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        channels = 16
        block1 = []
        for _ in range(layers):
            block1.append(DenseLayer(channels, growth))
            channels += growth
        self.block1 = nn.Sequential(*block1)
        self.transition = nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(), nn.Conv2d(channels, 24, 1, bias=False),
                                        nn.AvgPool2d(2))
        channels = 24
        block2 = []
        for _ in range(layers):
            block2.append(DenseLayer(channels, growth))
            channels += growth
        self.block2 = nn.Sequential(*block2)
        self.norm = nn.GroupNorm(4, channels)
        self.classifier = nn.Linear(channels * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.transition(self.block1(self.stem(x))))
        x = F.adaptive_avg_pool2d(F.relu(self.norm(x)), 2)
        return self.classifier(x.flatten(1))
