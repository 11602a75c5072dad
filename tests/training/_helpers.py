"""Small seeded models and batches shared by the sparse-training tests."""

from __future__ import annotations

import torch
from torch import nn


class TinyCNN(nn.Module):
    """Two convolutions (one with BatchNorm) and two linear layers: every layer kind a sparsifier meets."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc1 = nn.Linear(2 * width * 4 * 4, 24)
        self.fc2 = nn.Linear(24, 10)

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 2)
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def tiny_cnn(seed: int = 0, width: int = 4) -> TinyCNN:
    torch.manual_seed(seed)
    return TinyCNN(width)


def tiny_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 10))


def batches(count: int = 4, size: int = 16, shape=(1, 16, 16), seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, *shape, generator=generator), torch.randint(0, 10, (size,), generator=generator))
            for _ in range(count)]


def train_steps(model, sparsifier, data, optimizer, after_step=None, repeat: int = 1):
    for _ in range(repeat):
        for x, y in data:
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            sparsifier.step()
            if after_step is not None:
                after_step()
