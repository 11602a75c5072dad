"""Gradual magnitude pruning (Zhu & Gupta, 2017, "To prune, or not to prune").

Every ``frequency`` steps between ``start_step`` and ``end_step`` the smallest-magnitude weights
are pruned up to the cubic schedule's sparsity; pruned weights never come back.
"""

from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from prunekit.training.base import SPARSIFIERS, Sparsifier
from prunekit.training.schedules import CubicSchedule


@SPARSIFIERS.register("gmp")
class GMP(Sparsifier):
    name = "gmp"
    default_distribution = "uniform"

    def __init__(self, model: nn.Module, sparsity: float, distribution: str | Mapping[str, Any] | None = None, *,
                 end_step: int, start_step: int = 0, frequency: int = 100, initial_sparsity: float = 0.0,
                 **common: Any):
        self.schedule = CubicSchedule.build(start_step, end_step, frequency, initial_sparsity, sparsity, self.name)
        super().__init__(model, sparsity, distribution, **common)
        self.record("start")
        if self.schedule.is_update(0):
            self.prune_to(self.schedule.sparsity_at(0), "prune")

    def settings(self) -> dict:
        return self.schedule.to_dict()

    def update(self) -> bool:
        if not self.schedule.is_update(self.steps):
            return False
        self.prune_to(self.schedule.sparsity_at(self.steps), "prune")
        return True

    def prune_to(self, sparsity: float, event: str) -> None:
        scores = self.magnitude_scores()
        sparsities = self.allocate(sparsity, scores)
        self.apply_masks(self.masks_from_scores(scores, sparsities, monotone_from=self.masks()), event)
