"""Variance of gradients (Agarwal, D'souza & Hooker 2022, "Estimating Example Difficulty using Variance of Gradients").

At K checkpoints during training, take the gradient of the true-class logit with respect to the
input (averaged over colour channels, as the paper does for RGB). VoG is the per-pixel standard
deviation of that gradient across checkpoints, averaged over pixels, then normalised within each
class (z-score) so that classes with larger gradients do not dominate. High = hard / atypical.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from prunekit.data.base import HIGHER, SCORES, Score
from prunekit.errors import PrunekitError


def class_normalise(values: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(v - class mean) / class std within each class; a constant class becomes 0."""
    result = np.zeros_like(values, dtype=np.float64)
    for label in np.unique(labels):
        member = labels == label
        group = values[member]
        spread = group.std()
        result[member] = (group - group.mean()) / spread if spread > 0 else 0.0
    return result


@SCORES.register("vog")
class VoG(Score):
    summary = ("variance of input gradients of the true-class logit across training checkpoints, class-normalised "
               "(Agarwal et al. 2022)")
    harder = HIGHER
    needs = frozenset({"labels", "proxy_training"})

    every: int = Field(1, ge=1, description="a checkpoint after every `every` proxy epochs")
    class_normalised: bool = True

    def checkpoints(self, epochs: int) -> list[int]:
        return list(range(self.every, epochs + 1, self.every))

    def attach(self, run):
        checkpoints = self.checkpoints(run.stop_epoch)
        if len(checkpoints) < 2:
            raise PrunekitError(f"vog needs at least 2 checkpoints; with {run.stop_epoch} proxy epochs and "
                                f"every={self.every} it has {len(checkpoints)} (raise --epochs)")
        width = int(run.inputs[0].numel() // (run.inputs.shape[1] if run.inputs.ndim == 4 else 1))
        mean = torch.zeros(run.count, width, dtype=torch.float32)  # float32: two (N, pixels) arrays
        squares = torch.zeros(run.count, width, dtype=torch.float32)
        seen = {"k": 0}

        def accumulate(r) -> None:
            seen["k"] += 1
            k = seen["k"]

            def consume(start: int, gradient: torch.Tensor) -> None:
                g = (gradient.mean(dim=1) if gradient.ndim == 4 else gradient).flatten(1).float()
                rows = slice(start, start + g.shape[0])
                delta = g - mean[rows]
                mean[rows] += delta / k  # Welford: running mean and sum of squared deviations
                squares[rows] += delta * (g - mean[rows])

            r.input_gradients(consume)

        for epoch in checkpoints:
            run.at_epoch(epoch, accumulate)

        def finish():
            spread = (squares.double() / seen["k"]).clamp(min=0).sqrt().mean(dim=1).numpy()
            return class_normalise(spread, run.labels.numpy()) if self.class_normalised else spread

        return finish
