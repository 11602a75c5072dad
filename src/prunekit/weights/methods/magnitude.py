"""Magnitude pruning: remove the smallest |w| of each layer (data-free)."""

from __future__ import annotations

from typing import ClassVar

import torch

from prunekit.core.statistics import LayerStatistics
from prunekit.weights.base import METHODS, OneShotMethod


@METHODS.register("magnitude")
class Magnitude(OneShotMethod):
    comparable_across_layers: ClassVar[bool] = True

    def scores(self, weight: torch.Tensor, stats: LayerStatistics | None) -> torch.Tensor:
        return weight.abs()
