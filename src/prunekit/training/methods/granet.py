"""GraNet (Liu et al., 2021, "Sparse training via boosting pruning plasticity with neuroregeneration").

Gradual magnitude pruning on the cubic schedule (from ``initial_sparsity``: 0 starts dense, > 0
starts from a random ERK mask), plus neuroregeneration at every pruning step: after pruning, each
layer drops the f_t share of its active weights with the smallest |w| and regrows as many by
gradient magnitude (as in RigL), f_t decaying with a cosine from ``drop_fraction`` to 0 at
``end_step``. Global magnitude pruning by default, as in the authors' code.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from prunekit.core.allocation import get_allocation
from prunekit.training.base import SPARSIFIERS, check_fraction
from prunekit.training.dynamic import DynamicSparsifier
from prunekit.training.schedules import CubicSchedule, UpdateSchedule


@SPARSIFIERS.register("granet")
class GraNet(DynamicSparsifier):
    name = "granet"
    default_distribution = "global"
    needs_gradients = True

    def __init__(self, model: nn.Module, sparsity: float, distribution: str | Mapping[str, Any] | None = None, *,
                 end_step: int, start_step: int = 0, frequency: int = 100, initial_sparsity: float = 0.0,
                 drop_fraction: float = 0.5, decay: str = "cosine", **common: Any):
        self.pruning = CubicSchedule.build(start_step, end_step, frequency, initial_sparsity, sparsity, self.name)
        check_fraction(drop_fraction, f"{self.name}: drop_fraction")
        super().__init__(model, sparsity, distribution, end_step=end_step, update_interval=frequency,
                         drop_fraction=drop_fraction, decay=decay, **common)
        # regeneration follows the pruning steps (which include end_step) rather than DST's own grid
        self.schedule = UpdateSchedule(frequency, end_step, drop_fraction, decay, start_step)

    def initial_masks(self) -> dict[str, torch.Tensor]:
        if self.pruning.initial == 0:
            return self.masks()
        sparsities = get_allocation("erk").allocate([layer.info() for layer in self.layers], self.pruning.initial, None)
        return self.masks_from_scores(self.random_scores(self.generator(0)), sparsities, monotone_from=self.masks())

    def settings(self) -> dict:
        return {**self.pruning.to_dict(), "drop_fraction": self.schedule.fraction, "decay": self.schedule.decay}

    def wants_gradients_at(self, step: int) -> bool:
        return self.pruning.is_update(step) and self.schedule.fraction_at(step) > 0

    def grow_scores(self) -> dict[str, torch.Tensor]:
        return {name: grad.abs() for name, grad in self.gradients().items()}

    def update(self) -> bool:
        if not self.pruning.is_update(self.steps):
            return False
        target = self.pruning.sparsity_at(self.steps)
        scores = self.magnitude_scores()
        self.apply_masks(self.masks_from_scores(scores, self.allocate(target, scores), monotone_from=self.masks()),
                         "prune")
        fraction = self.schedule.fraction_at(self.steps)
        if fraction > 0:
            self.rewire(fraction, f"regenerate ({fraction:.3f})")
        return True
