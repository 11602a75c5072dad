"""GraNet (Liu et al., 2021, "Sparse training via boosting pruning plasticity with neuroregeneration").

Gradual magnitude pruning on the cubic schedule (from ``initial_sparsity``: 0 starts dense, > 0
starts from a random ERK mask), plus neuroregeneration at every pruning step: after pruning, each
layer drops the f_t share of its active weights with the smallest |w| and regrows as many by
gradient magnitude (as in RigL), f_t decaying with a cosine from ``drop_fraction`` to 0 at
``end_step``. Global magnitude pruning by default, as in the authors' code.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from prunekit.core.allocation import get_allocation
from prunekit.training.dynamic import DynamicSparsifier
from prunekit.training.method import SPARSIFIERS
from prunekit.training.methods.gmp import GMPMethod
from prunekit.training.schedules import CubicSchedule, UpdateSchedule


@SPARSIFIERS.register("granet")
class GraNetMethod(GMPMethod):
    """GMP's schedule, and how much of each layer regenerates at a pruning step."""

    default_distribution = "global"
    needs = frozenset({"schedule", "gradients"})

    drop_fraction: float = Field(0.5, gt=0, lt=1)
    decay: Literal["cosine", "constant"] = "cosine"


class GraNet(DynamicSparsifier):
    method_class = GraNetMethod

    def prepare(self) -> None:
        method = self.method
        self.pruning = CubicSchedule.build(method.start_step, method.end_step, method.frequency,
                                           method.initial_sparsity, self.target_sparsity, self.name)
        # regeneration follows the pruning steps (which include end_step) rather than DST's own grid
        self.schedule = UpdateSchedule(method.frequency, method.end_step, method.drop_fraction, method.decay,
                                       method.start_step)

    def initial_masks(self) -> dict[str, torch.Tensor]:
        if self.pruning.initial == 0:
            return self.masks()
        sparsities = get_allocation("erk").allocate([layer.info() for layer in self.layers], self.pruning.initial, None)
        return self.masks_from_scores(self.random_scores(self.generator(0)), sparsities, monotone_from=self.masks())

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
