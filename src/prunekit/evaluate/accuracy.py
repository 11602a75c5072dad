"""Classification accuracy of a model over in-memory tensors."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def accuracy(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> float:
    was_training = model.training
    model.eval()
    correct = 0
    device = next(model.parameters()).device
    for start in range(0, inputs.shape[0], batch_size):
        logits = model(inputs[start:start + batch_size].to(device))
        correct += int((logits.argmax(dim=-1).cpu() == labels[start:start + batch_size]).sum())
    model.train(was_training)
    return correct / max(inputs.shape[0], 1)
