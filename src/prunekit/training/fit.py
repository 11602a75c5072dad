"""The plain-loop helper: train a classifier under a sparsifier with ``training.loop.train_classifier``.

``train_sparse`` calls ``sparsifier.step()`` after every optimizer step, gives the sparsifier the
optimizer (so masks changes reset optimizer state), runs the rounds of a method that needs "rounds"
(a lottery ticket: each round with a fresh optimizer and the data order and learning-rate schedule
rewound to the rewind epoch), and records what reports need: loss per epoch, sparsity over
training, accuracy per round.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.evaluate.accuracy import accuracy
from prunekit.training.base import Sparsifier, TrainsInRounds, check_positive_int
from prunekit.training.loop import StepInfo, make_optimizer, train_classifier


@dataclass
class SparseRun:
    """What a sparse training run produced (JSON-ready through ``to_dict``)."""

    epochs: list[dict] = field(default_factory=list)  # epoch, round, mean training loss, sparsity[, test accuracy]
    rounds: list[dict] = field(default_factory=list)  # pruning rounds: sparsity and test accuracy at the round's end
    steps: int = 0
    seconds: float = 0.0
    final_accuracy: float | None = None

    def to_dict(self) -> dict:
        return {"epochs": self.epochs, "rounds": self.rounds, "steps": self.steps, "seconds": self.seconds,
                "final_accuracy": self.final_accuracy}


def steps_per_epoch(examples: int, batch_size: int) -> int:
    return (examples + batch_size - 1) // batch_size


def train_sparse(model: nn.Module, sparsifier: Sparsifier | None, inputs: torch.Tensor, labels: torch.Tensor,
                 epochs: int, *, batch_size: int = 128, lr: float = 0.05, optimizer: str = "sgd",
                 momentum: float = 0.9, weight_decay: float = 5e-4, seed: int = 0,
                 test: tuple[torch.Tensor, torch.Tensor] | None = None, evaluate_every_epoch: bool = False,
                 on_step: Callable[[StepInfo], None] | None = None, description: str = "Training") -> SparseRun:
    """Train ``model`` for ``epochs`` (per round, for a method that trains in rounds) with ``sparsifier`` stepping along.

    ``sparsifier=None`` trains densely (the baseline). The optimizer is built here (SGD with
    Nesterov momentum or AdamW, cosine learning rate), the same for every method.
    """
    epochs = check_positive_int(epochs, "epochs")
    batch_size = check_positive_int(batch_size, "batch size")
    if inputs.shape[0] != labels.shape[0] or inputs.shape[0] == 0:
        raise PrunekitError(f"{inputs.shape[0]} inputs but {labels.shape[0]} labels; both must match and be non-empty")
    per_epoch = steps_per_epoch(inputs.shape[0], batch_size)
    run = SparseRun()
    started = time.perf_counter()
    rounds: TrainsInRounds | None = sparsifier if sparsifier is not None and "rounds" in sparsifier.needs else None
    if rounds is not None:
        if rounds.steps_per_round != epochs * per_epoch or rounds.rewind_step % per_epoch:
            raise PrunekitError(f"{sparsifier.name}: steps_per_round ({rounds.steps_per_round}) must be epochs × steps "
                                f"per epoch ({epochs} × {per_epoch}) and rewind_step ({rounds.rewind_step}) a whole "
                                "number of epochs for train_sparse")
    round_index = 0

    def evaluate() -> float | None:
        return accuracy(model, *test) if test is not None else None

    def step_hook(info: StepInfo) -> None:
        if rounds is not None and not rounds.finished and rounds.round_step + 1 == rounds.steps_per_round:
            run.rounds.append({"round": rounds.round, "sparsity": rounds.sparsity, "test_accuracy": evaluate()})
        if sparsifier is not None:
            sparsifier.step()
        run.steps += 1
        if on_step is not None:
            on_step(info)

    def epoch_hook(epoch: int) -> None:
        record = {"epoch": epoch, "round": round_index, "sparsity": sparsifier.sparsity if sparsifier else 0.0}
        if evaluate_every_epoch and test is not None:
            record["test_accuracy"] = evaluate()
        run.epochs.append(record)

    while True:
        opt = make_optimizer(model, optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay)
        if sparsifier is not None:
            sparsifier.attach_optimizer(opt)
        first_epoch = 0 if round_index == 0 or rounds is None else rounds.rewind_step // per_epoch
        label = description if rounds is None else f"{description} (round {round_index} of {rounds.pruning_rounds})"
        history = train_classifier(model, inputs, labels, epochs=epochs, batch_size=batch_size, optimizer=opt,
                                   seed=seed, on_step=step_hook, on_epoch=epoch_hook, description=label,
                                   start_epoch=first_epoch)
        for record, loss in zip(run.epochs[-len(history.losses):], history.losses):
            record["loss"] = loss
        if rounds is None or rounds.finished and round_index >= rounds.pruning_rounds:
            break
        round_index += 1
    run.final_accuracy = evaluate()
    if rounds is not None:
        run.rounds.append({"round": rounds.round, "sparsity": rounds.sparsity, "test_accuracy": run.final_accuracy})
    run.seconds = time.perf_counter() - started
    if sparsifier is not None:
        sparsifier.attach_optimizer(None)
    return run
