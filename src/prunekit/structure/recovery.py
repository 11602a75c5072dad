"""A short fine-tune after shrinking: distillation from the unpruned model, or the plain training loss.

Language models train on calibration text windows (never the test text) with AdamW, a short
warm-up and a cosine decay over the time (or step) budget, so a run stops on time with its
learning rate already low. Distillation matches the student's next-token distribution to the
teacher's (KL divergence at temperature T, scaled by T²). The (tied) embedding is frozen by
default: its gradient costs as much as the output layer's forward and it was not pruned.
Classifiers use ``prunekit.training.loop.train_classifier`` for the plain loss, and the same loop
shape with a distillation loss otherwise.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.core.progress import progress_bar
from prunekit.errors import PrunekitError

Mode = Literal["distill", "plain"]


@dataclass
class RecoveryResult:
    mode: str
    steps: int
    seconds: float
    samples: int
    tokens: int
    lr: float
    losses: list[float] = field(default_factory=list)  # mean loss of every 10 steps (or epoch)

    def to_dict(self) -> dict:
        return asdict(self)


def _schedule(lr: float, progress: float, step: int, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    vocab = student_logits.shape[-1]
    student = F.log_softmax(student_logits.reshape(-1, vocab).float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.reshape(-1, vocab).float() / temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature ** 2


def recover_lm(student: nn.Module, windows: torch.Tensor, teacher: nn.Module | None = None, mode: Mode = "plain",
               max_seconds: float | None = 600.0, max_steps: int | None = None, lr: float = 3e-4,
               batch_size: int = 1, temperature: float = 1.0, weight_decay: float = 0.0, seed: int = 0,
               train_embeddings: bool = False, warmup: int = 10,
               train_only: tuple[str, ...] = ()) -> RecoveryResult:
    """Fine-tune ``student`` on token ``windows`` until the time or step budget runs out; no step
    starts that would, at the mean step time so far, end past ``max_seconds``. ``train_only``: name
    fragments (``"mlp."``) of the parameters to train; the others stay frozen and cost no weight
    gradient."""
    if mode not in ("distill", "plain"):
        raise PrunekitError(f"unknown recovery mode '{mode}'; choose distill or plain")
    if mode == "distill" and teacher is None:
        raise PrunekitError("distillation needs the unpruned teacher model")
    if not max_seconds and not max_steps:
        raise PrunekitError("give the recovery a time budget (seconds) or a number of steps")
    if (max_seconds is not None and max_seconds <= 0) or (max_steps is not None and max_steps <= 0):
        raise PrunekitError("the recovery budget must be positive")
    embeddings = student.get_input_embeddings() if hasattr(student, "get_input_embeddings") else None
    frozen = {id(embeddings.weight)} if (embeddings is not None and not train_embeddings) else set()
    if train_only:
        frozen |= {id(p) for name, p in student.named_parameters() if not any(part in name for part in train_only)}
    parameters = [p for p in student.parameters() if id(p) not in frozen]
    if not parameters:
        raise PrunekitError(f"no parameter left to train (train_only={list(train_only)})")
    previous = {id(p): p.requires_grad for p in student.parameters()}
    for parameter in student.parameters():
        parameter.requires_grad_(id(parameter) not in frozen)
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    if teacher is not None:
        teacher.eval()
    student.train()
    losses, window_losses = [], []
    steps = samples = tokens = 0
    started = time.perf_counter()
    total = max_steps if max_steps else None
    try:
        with progress_bar("Recovery fine-tune", total) as bar:
            while True:
                elapsed = time.perf_counter() - started
                # The time budget is a ceiling: no step starts that the mean step so far says would overrun it.
                overrun = bool(max_seconds) and steps > 0 and elapsed + elapsed / steps > max_seconds
                if (max_seconds and elapsed >= max_seconds) or overrun or (max_steps and steps >= max_steps):
                    break
                progress = max(elapsed / max_seconds if max_seconds else 0.0, steps / max_steps if max_steps else 0.0)
                for group in optimizer.param_groups:
                    group["lr"] = _schedule(lr, progress, steps, warmup)
                batch = windows[torch.randint(0, windows.shape[0], (batch_size,), generator=generator)]
                output = student(input_ids=batch, labels=batch if mode == "plain" else None, use_cache=False)
                if mode == "plain":
                    loss = output.loss
                else:
                    with torch.no_grad():
                        teacher_logits = teacher(input_ids=batch, use_cache=False).logits
                    loss = distillation_loss(output.logits[:, :-1], teacher_logits[:, :-1], temperature)
                if not torch.isfinite(loss):
                    raise PrunekitError(f"the recovery loss became {float(loss)} at step {steps}; lower the learning rate")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(parameters, 1.0)
                optimizer.step()
                steps += 1
                samples += batch.shape[0]
                tokens += batch.numel()
                window_losses.append(float(loss.detach()))
                if len(window_losses) == 10:
                    losses.append(sum(window_losses) / len(window_losses))
                    window_losses = []
                bar.advance()
    finally:
        optimizer.zero_grad(set_to_none=True)
        for parameter in student.parameters():
            parameter.requires_grad_(previous.get(id(parameter), True))
        student.eval()
    if window_losses:
        losses.append(sum(window_losses) / len(window_losses))
    return RecoveryResult(mode, steps, time.perf_counter() - started, samples, tokens, lr, losses)


def recover_classifier(student: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, teacher: nn.Module | None = None,
                       mode: Mode = "plain", epochs: int = 1, lr: float = 0.01, batch_size: int = 128,
                       temperature: float = 4.0, alpha: float = 0.5, seed: int = 0) -> RecoveryResult:
    """Fine-tune a classifier with the shared training loop: plain cross-entropy, or knowledge
    distillation, alpha·KL(teacher‖student)·T² + (1 − alpha)·CE per example."""
    from prunekit.training.loop import train_classifier

    if mode not in ("distill", "plain"):
        raise PrunekitError(f"unknown recovery mode '{mode}'; choose distill or plain")
    started = time.perf_counter()
    if mode == "plain":
        history = train_classifier(student, inputs, labels, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                                   description="Recovery fine-tune")
    else:
        if teacher is None:
            raise PrunekitError("distillation needs the unpruned teacher model")
        teacher.eval()
        with torch.no_grad():
            targets = torch.cat([teacher(inputs[i:i + 512]) for i in range(0, inputs.shape[0], 512)])

        # The loop hands the loss each batch's "labels": here dataset indices, to look up both targets.
        def loss_fn(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
            soft = F.kl_div(F.log_softmax(logits / temperature, dim=-1), F.log_softmax(targets[index] / temperature, dim=-1),
                            log_target=True, reduction="none").sum(-1) * temperature ** 2
            return alpha * soft + (1 - alpha) * F.cross_entropy(logits, labels[index], reduction="none")

        history = train_classifier(student, inputs, torch.arange(inputs.shape[0]), epochs=epochs,
                                   batch_size=batch_size, lr=lr, seed=seed, loss_fn=loss_fn,
                                   description="Recovery fine-tune (distillation)")
    return RecoveryResult(mode, history.steps, time.perf_counter() - started, epochs * inputs.shape[0], 0, lr,
                          history.losses)
