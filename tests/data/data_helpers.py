"""Helpers shared by the data-pruning tests (a module with a unique name: test folders are not packages)."""

from __future__ import annotations

import torch

from prunekit.data import ProxyConfig

FAST_PROXY = dict(model="cnn", cnn_width=8, batch_size=64)


def fast_proxy(**overrides) -> ProxyConfig:
    return ProxyConfig(**{**FAST_PROXY, "epochs": 2, "seeds": 2, **overrides})


def tiny_classifier(inputs: int = 6, classes: int = 3, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(inputs, 5), torch.nn.Tanh(), torch.nn.Linear(5, classes))
