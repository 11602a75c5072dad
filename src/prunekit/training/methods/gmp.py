"""Gradual magnitude pruning (Zhu & Gupta, 2017, "To prune, or not to prune").

Every ``frequency`` steps between ``start_step`` and ``end_step`` the smallest-magnitude weights
are pruned up to the cubic schedule's sparsity; pruned weights never come back.
"""

from __future__ import annotations

from typing import Any, Mapping

from pydantic import Field, model_validator

from prunekit.training.base import Sparsifier
from prunekit.training.method import SPARSIFIERS, SparseTrainingMethod, TrainingRun
from prunekit.training.schedules import CubicSchedule, default_window, window_problem


@SPARSIFIERS.register("gmp")
class GMPMethod(SparseTrainingMethod):
    """The cubic schedule: where it starts and ends, how often it prunes, the sparsity it starts from.

    In a run of known length it prunes from 10 % to 75 % of the steps, about 20 times.
    """

    needs = frozenset({"schedule"})

    end_step: int = Field(ge=1)
    start_step: int = Field(0, ge=0)
    frequency: int = Field(100, ge=1, description="steps between two pruning steps")
    initial_sparsity: float = Field(0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _window(self) -> "GMPMethod":
        problem = window_problem(self.start_step, self.end_step)
        if problem:
            raise ValueError(problem)
        return self

    @classmethod
    def settings_for(cls, run: TrainingRun, given: Mapping[str, Any]) -> dict[str, Any]:
        start, end = default_window(run.total_steps)
        return {"start_step": start, "end_step": end, "frequency": max((end - start) // 20, 1), **given}


class GMP(Sparsifier):
    method_class = GMPMethod

    def prepare(self) -> None:
        method = self.method
        self.schedule = CubicSchedule.build(method.start_step, method.end_step, method.frequency,
                                            method.initial_sparsity, self.target_sparsity, self.name)

    def start(self) -> None:
        if self.schedule.is_update(0):
            self.prune_to(self.schedule.sparsity_at(0), "prune")

    def update(self) -> bool:
        if not self.schedule.is_update(self.steps):
            return False
        self.prune_to(self.schedule.sparsity_at(self.steps), "prune")
        return True

    def prune_to(self, sparsity: float, event: str) -> None:
        scores = self.magnitude_scores()
        sparsities = self.allocate(sparsity, scores)
        self.apply_masks(self.masks_from_scores(scores, sparsities, monotone_from=self.masks()), event)
