"""Pruning at initialisation: score every weight once, before training, then keep that mask fixed.

Scoring runs forward and backward passes on the user's model; it leaves no trace there: the
weights, the gradients (``.grad``) and the buffers (BatchNorm statistics) are as they were.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from prunekit.core.masks import WeightMask
from prunekit.errors import PrunekitError
from prunekit.training.base import Sparsifier, iterate_batches
from prunekit.training.method import SparseTrainingMethod

LossFn = Callable[[nn.Module, Any], torch.Tensor]


def classification_loss(model: nn.Module, batch: Any, temperature: float = 1.0) -> torch.Tensor:
    """Cross-entropy of ``model(inputs) / temperature`` for a batch ``(inputs, targets)``."""
    inputs, targets = batch[0], batch[1]
    device = next(model.parameters()).device
    return F.cross_entropy(model(inputs.to(device)) / temperature, targets.to(device))


@contextlib.contextmanager
def untouched_buffers(model: nn.Module) -> Iterator[None]:
    """Restore every buffer (BatchNorm running statistics) except masks after scoring passes."""
    masks = {id(m.mask) for m in model.modules() if isinstance(m, WeightMask)}
    saved = [(buffer, buffer.detach().clone()) for buffer in model.buffers() if id(buffer) not in masks]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


class AtInitialization(Sparsifier):
    """Computes scores when built, prunes to the target at once; the mask then stays fixed."""

    def start(self) -> None:
        self.apply_masks(self.initial_masks(), "prune at init")

    def initial_masks(self) -> dict[str, torch.Tensor]:
        """The masks at the target sparsity: the method's scores, allocated by the distribution."""
        scores = self.compute_scores()
        sparsities = self.allocate(self.target_sparsity, scores)
        return self.masks_from_scores(scores, sparsities, monotone_from=self.masks())

    def compute_scores(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def originals(self) -> list[torch.Tensor]:
        return [layer.original for layer in self.layers]

    @contextlib.contextmanager
    def differentiable(self) -> Iterator[list[torch.Tensor]]:
        """The weights as leaves that require grad (even if frozen), with buffers restored afterwards."""
        params = self.originals()
        previous = [p.requires_grad for p in params]
        try:
            for p in params:
                p.requires_grad_(True)
            with untouched_buffers(self.model), torch.enable_grad():
                yield params
        finally:
            for p, flag in zip(params, previous):
                p.requires_grad_(flag)


class DataScoredMethod(SparseTrainingMethod):
    """A pruning-at-init method that scores the weights on a few batches of training data with a loss."""

    default_distribution = "global"
    needs = frozenset({"data", "loss"})

    batches: int = Field(1, ge=1, description="batches of the given data scored (their gradients are summed)")


class DataScored(AtInitialization):
    """Takes ``data`` (batches ``(inputs, targets)``) and, optionally, ``loss_fn(model, batch)``."""

    def __init__(self, model: nn.Module, sparsity: float, distribution: str | Mapping[str, Any] | None = None, *,
                 data: Iterable[Any] | Sequence[Any] | None = None, loss_fn: LossFn | None = None, **common: Any):
        self.given_data = data
        self.loss_fn = loss_fn
        super().__init__(model, sparsity, distribution, **common)

    def prepare(self) -> None:
        if self.given_data is None:
            raise PrunekitError(f"{self.name} scores the weights on training data: pass data=[(inputs, targets), ...]")
        self.data = iterate_batches(self.given_data, self.method.batches)
        self.given_data = None

    def start(self) -> None:
        super().start()
        self.data = []  # scoring is done; do not keep the batches alive

    def loss(self, batch: Any) -> torch.Tensor:
        return (self.loss_fn or classification_loss)(self.model, batch)
