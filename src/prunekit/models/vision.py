"""Small vision models defined by prunekit itself (no torchvision), sized for CPU experiments."""

from __future__ import annotations

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
