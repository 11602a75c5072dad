"""A plain, seeded training loop for classifiers on in-memory tensors.

Sparse-training methods, data-pruning proxies and recovery fine-tunes all train small models;
they plug into this loop through ``on_step`` / ``on_epoch`` callbacks instead of writing their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.core.progress import progress_bar


@dataclass
class StepInfo:
    """What a callback sees after each optimizer step."""

    epoch: int
    step: int  # global step, counted from 0
    indices: torch.Tensor  # dataset indices of the batch
    logits: torch.Tensor
    loss: torch.Tensor  # per-example losses of the batch (detached)
    optimizer: torch.optim.Optimizer


@dataclass
class History:
    losses: list[float] = field(default_factory=list)  # mean loss of every epoch
    steps: int = 0


def make_optimizer(model: nn.Module, name: str = "sgd", lr: float = 0.05, momentum: float = 0.9,
                   weight_decay: float = 5e-4) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=momentum > 0)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name}")


def train_classifier(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, epochs: int = 2,
                     batch_size: int = 128, optimizer: torch.optim.Optimizer | None = None, lr: float = 0.05,
                     seed: int = 0, cosine: bool = True,
                     on_step: Callable[[StepInfo], None] | None = None,
                     on_epoch: Callable[[int], None] | None = None,
                     description: str = "Training") -> History:
    """Minibatch training with a seeded shuffle; ``on_step`` runs after every ``optimizer.step()``."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = optimizer or make_optimizer(model, lr=lr)
    steps_per_epoch = (inputs.shape[0] + batch_size - 1) // batch_size
    total = epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total, 1)) if cosine else None
    device = next(model.parameters()).device
    history = History()
    model.train()
    with progress_bar(description, total) as bar:
        for epoch in range(epochs):
            order = torch.randperm(inputs.shape[0], generator=generator)
            running = 0.0
            for start in range(0, inputs.shape[0], batch_size):
                indices = order[start:start + batch_size]
                x, y = inputs[indices].to(device), labels[indices].to(device)
                logits = model(x)
                losses = F.cross_entropy(logits, y, reduction="none")
                optimizer.zero_grad(set_to_none=True)
                losses.mean().backward()
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                if on_step is not None:
                    on_step(StepInfo(epoch, history.steps, indices, logits.detach(), losses.detach(), optimizer))
                running += float(losses.detach().sum())
                history.steps += 1
                bar.advance()
            history.losses.append(running / inputs.shape[0])
            if on_epoch is not None:
                on_epoch(epoch)
    model.eval()
    return history
