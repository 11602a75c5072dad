"""Wanda (Sun et al., 2023): prune by |W_ij| · ‖X_j‖₂, compared within each output row."""

from __future__ import annotations

from typing import ClassVar

import torch

from prunekit.core.statistics import InputNorms, LayerStatistics
from prunekit.weights.base import METHODS, OneShotMethod


@METHODS.register("wanda")
class Wanda(OneShotMethod):
    statistics: ClassVar[type[LayerStatistics]] = InputNorms
    per_row: ClassVar[bool] = True

    def scores(self, weight: torch.Tensor, stats: LayerStatistics | None) -> torch.Tensor:
        assert isinstance(stats, InputNorms)
        return weight.abs() * stats.norms().to(weight.device).unsqueeze(0)
