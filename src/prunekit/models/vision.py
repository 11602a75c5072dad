"""Small vision models defined by prunekit itself (no torchvision), sized for CPU experiments.

Besides ``SmallCNN`` and ``MLP``, three convolutional networks of clearly different shapes, each
sized to train on Fashion-MNIST in minutes on two CPU cores (``benchmarks/structure_cnn_defaults.py``
measures structural-pruning criteria on them; the residual shape is ``prunekit.structure.zoo.ResNetLike``):

- ``VGGNet``: plain, no skip and no branch: stacks of 3×3 convolutions, max-pools, and a flatten
  into a two-layer classifier that holds half the parameters;
- ``MobileNetSE``: depthwise-separable inverted residuals with squeeze-excitation gates;
- ``InceptionNet``: blocks whose branches (a 1×1 convolution, a 1×1 reduction into a grouped 3×3
  convolution, a pooled 1×1 convolution) are concatenated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SmallCNN(nn.Module):
    """Two conv blocks and a two-layer classifier: about 89 % on Fashion-MNIST after 2 epochs."""

    def __init__(self, num_classes: int = 10, width: int = 32, in_channels: int = 1,
                 image_size: int | tuple[int, int] = 28):
        super().__init__()
        # two 2x2 max-pools: the classifier sees a (size // 4) grid; 28 -> 7 for Fashion-MNIST
        height, width_px = (image_size, image_size) if isinstance(image_size, int) else image_size
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * (height // 4) * (width_px // 4), 128), nn.ReLU(),
                                        nn.Linear(128, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class MLP(nn.Module):
    """A fully connected classifier on flattened images."""

    def __init__(self, num_classes: int = 10, in_features: int = 784, hidden: tuple[int, ...] = (300, 100)):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


def conv_bn_relu(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1,
                 activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """Convolution (no bias: the BatchNorm after it has one), BatchNorm, activation."""
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), activation())


class VGGNet(nn.Module):
    """Plain VGG-style: ``convs_per_stage[i]`` 3×3 convolutions of ``widths[i]`` channels, then a 2×2
    max-pool; the last map is flattened into a hidden Linear layer and the class layer."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, ...] = (32, 64, 128),
                 convs_per_stage: tuple[int, ...] = (1, 2, 2), hidden: int = 256, in_channels: int = 1,
                 image_size: int = 28):
        super().__init__()
        if len(widths) != len(convs_per_stage):
            raise ValueError("one convolution count per stage width")
        layers: list[nn.Module] = []
        channels, size = in_channels, image_size
        for width, count in zip(widths, convs_per_stage):
            for _ in range(count):
                layers.append(conv_bn_relu(channels, width))
                channels = width
            layers.append(nn.MaxPool2d(2))
            size //= 2
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(channels * size * size, hidden), nn.ReLU(),
                                        nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class SqueezeExcitation(nn.Module):
    """Channel gates from the globally pooled input: x · hardsigmoid(expand(relu(reduce(mean(x)))))."""

    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * F.hardsigmoid(self.expand(F.relu(self.reduce(x.mean((2, 3), keepdim=True)))))


class InvertedResidualSE(nn.Module):
    """MobileNetV3-style: 1×1 expansion, depthwise 3×3, squeeze-excitation, 1×1 projection, and a
    residual add when the shape allows it."""

    def __init__(self, cin: int, cout: int, stride: int = 1, expansion: int = 4):
        super().__init__()
        hidden = cin * expansion
        self.expand = conv_bn_relu(cin, hidden, 1, activation=nn.Hardswish)
        self.depthwise = conv_bn_relu(hidden, hidden, 3, stride, groups=hidden, activation=nn.Hardswish)
        self.se = SqueezeExcitation(hidden, max(8, hidden // 4))
        self.project = nn.Sequential(nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.se(self.depthwise(self.expand(x))))
        return x + y if self.residual else y


class MobileNetSE(nn.Module):
    """Depthwise-separable: a stem, inverted residual blocks with squeeze-excitation (``blocks``: one
    (output channels, stride, expansion) per block), a 1×1 head, global average pooling, a Linear."""

    def __init__(self, num_classes: int = 10, stem: int = 16,
                 blocks: tuple[tuple[int, int, int], ...] = ((24, 2, 4), (24, 1, 4), (40, 2, 4), (40, 1, 4),
                                                             (40, 1, 4)),
                 head: int = 128, in_channels: int = 1):
        super().__init__()
        self.stem = conv_bn_relu(in_channels, stem, 3, activation=nn.Hardswish)
        layers, channels = [], stem
        for cout, stride, expansion in blocks:
            layers.append(InvertedResidualSE(channels, cout, stride, expansion))
            channels = cout
        self.blocks = nn.Sequential(*layers)
        self.head = conv_bn_relu(channels, head, 1, activation=nn.Hardswish)
        self.classifier = nn.Linear(head, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))


class InceptionBlock(nn.Module):
    """Three branches concatenated along the channels: a 1×1 convolution; a 1×1 reduction into a
    grouped 3×3 convolution (ResNeXt's cardinality); a 3×3 max-pool into a 1×1 convolution."""

    def __init__(self, cin: int, single: int, grouped: int, groups: int, pooled: int):
        super().__init__()
        self.single = conv_bn_relu(cin, single, 1)
        self.grouped = nn.Sequential(conv_bn_relu(cin, grouped, 1), conv_bn_relu(grouped, grouped, 3, groups=groups))
        self.pooled = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv_bn_relu(cin, pooled, 1))

    @property
    def out_channels(self) -> int:
        return self.single[0].out_channels + self.grouped[1][0].out_channels + self.pooled[1][0].out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.single(x), self.grouped(x), self.pooled(x)], dim=1)


class InceptionNet(nn.Module):
    """A stem and Inception blocks (``blocks``: one (single, grouped, groups, pooled) per block), a 2×2
    max-pool after the stem and after every block but the last, global average pooling and a Linear."""

    def __init__(self, num_classes: int = 10, stem: int = 32,
                 blocks: tuple[tuple[int, int, int, int], ...] = ((32, 64, 8, 32), (64, 128, 8, 64)),
                 in_channels: int = 1):
        super().__init__()
        self.stem = conv_bn_relu(in_channels, stem, 3)
        layers: list[nn.Module] = [nn.MaxPool2d(2)]
        channels = stem
        for index, (single, grouped, groups, pooled) in enumerate(blocks):
            block = InceptionBlock(channels, single, grouped, groups, pooled)
            layers.append(block)
            channels = block.out_channels
            if index < len(blocks) - 1:
                layers.append(nn.MaxPool2d(2))
        self.blocks = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))
