"""A plain, seeded training loop for classifiers on in-memory tensors.

Sparse-training methods, data-pruning proxies and recovery fine-tunes all train small models;
they plug into this loop through ``on_step`` / ``on_epoch`` callbacks instead of writing their own.
"""

from __future__ import annotations

import warnings
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
                     description: str = "Training", start_epoch: int = 0,
                     loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                     stop_epoch: int | None = None, sampler=None) -> History:
    """Minibatch training with a seeded shuffle; ``on_step`` runs after every ``optimizer.step()``.

    ``loss_fn(logits, labels)`` returns per-example losses (default: cross-entropy). ``stop_epoch``
    ends the run after that many epochs while the learning-rate schedule still spans ``epochs``, so
    early-training states (data-pruning scores) are those of the full schedule. ``sampler`` (a
    ``torch.utils.data.Sampler`` of dataset indices with a fixed ``len``, such as a dynamic data-pruning
    sampler) replaces the seeded shuffle; its ``set_epoch(epoch)`` is called before every epoch.

    ``start_epoch`` resumes the same run part-way (a checkpoint, or a lottery ticket rewound to an
    epoch): the shuffles and the learning-rate schedule of the earlier epochs are replayed, not
    trained, so epoch ``e`` sees the same batches and learning rate as in an uninterrupted run, and
    ``StepInfo.step`` counts from the start of the run.
    """
    generator = torch.Generator().manual_seed(seed)
    optimizer = optimizer or make_optimizer(model, lr=lr)
    per_epoch = len(sampler) if sampler is not None else inputs.shape[0]
    steps_per_epoch = (per_epoch + batch_size - 1) // batch_size
    total = epochs * steps_per_epoch
    start_epoch = min(max(int(start_epoch), 0), epochs)
    if start_epoch and cosine:
        # a resumed optimizer holds the decayed rate; the replayed schedule starts from the original one
        for group in optimizer.param_groups:
            group["lr"] = group.get("initial_lr", group["lr"])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total, 1)) if cosine else None
    device = next(model.parameters()).device
    history = History()
    for _ in range(start_epoch if sampler is None else 0):
        torch.randperm(inputs.shape[0], generator=generator)
    if scheduler is not None and start_epoch:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # stepping the schedule before any optimizer step is the point here
            for _ in range(start_epoch * steps_per_epoch):
                scheduler.step()
    global_step = start_epoch * steps_per_epoch
    model.train()
    end_epoch = epochs if stop_epoch is None else min(max(int(stop_epoch), start_epoch), epochs)
    with progress_bar(description, (end_epoch - start_epoch) * steps_per_epoch) as bar:
        for epoch in range(start_epoch, end_epoch):
            if sampler is not None:
                if hasattr(sampler, "set_epoch"):
                    sampler.set_epoch(epoch)
                order = torch.as_tensor(list(iter(sampler)), dtype=torch.long)
            else:
                order = torch.randperm(inputs.shape[0], generator=generator)
            running = 0.0
            for start in range(0, order.numel(), batch_size):
                indices = order[start:start + batch_size]
                x, y = inputs[indices].to(device), labels[indices].to(device)
                logits = model(x)
                losses = loss_fn(logits, y) if loss_fn is not None else F.cross_entropy(logits, y, reduction="none")
                optimizer.zero_grad(set_to_none=True)
                losses.mean().backward()
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                if on_step is not None:
                    on_step(StepInfo(epoch, global_step, indices, logits.detach(), losses.detach(), optimizer))
                running += float(losses.detach().sum())
                history.steps += 1
                global_step += 1
                bar.advance()
            history.losses.append(running / max(order.numel(), 1))
            if on_epoch is not None:
                on_epoch(epoch)
    model.eval()
    return history
