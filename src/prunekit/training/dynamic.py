"""Dynamic sparse training: a sparse mask from the start, rewired every ΔT steps (drop, then grow).

At each update, in every layer, the ``k = ⌊f_t · active⌋`` active weights of smallest magnitude
are dropped and ``k`` inactive connections are grown (chosen among all connections inactive after
the drop), so every layer keeps its count of active weights exactly. Grown connections start at 0
with fresh optimizer state; a dropped weight that is regrown at once keeps its value, as in the
RigL code. ``f_t`` decays with a cosine from ``drop_fraction`` to 0 at ``end_step`` (RigL), or
stays constant; there are no updates from ``end_step`` on.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Mapping

import torch
from pydantic import Field

from prunekit.training.base import Sparsifier
from prunekit.training.method import SparseTrainingMethod, TrainingRun
from prunekit.training.schedules import UpdateSchedule, default_window


class DropAndGrowMethod(SparseTrainingMethod):
    """How often masks are rewired, until when, and how much: SET's and RigL's settings.

    In a run of known length it rewires every ``min(100, steps / 40)`` steps until 75 % of it.
    """

    default_distribution = "erk"
    needs = frozenset({"schedule"})

    end_step: int = Field(ge=1, description="no updates from this step on (RigL: 75 % of training)")
    update_interval: int = Field(100, ge=1, description="ΔT, steps between two updates")
    drop_fraction: float = Field(0.3, gt=0, lt=1, description="α, the share of active weights rewired at first")
    decay: Literal["cosine", "constant"] = "cosine"

    @classmethod
    def settings_for(cls, run: TrainingRun, given: Mapping[str, Any]) -> dict[str, Any]:
        _, end = default_window(run.total_steps)
        return {"end_step": end, "update_interval": max(min(100, run.total_steps // 40), 1), **given}


def drop_and_grow(mask: torch.Tensor, magnitude: torch.Tensor, grow_scores: torch.Tensor, count: int) -> torch.Tensor:
    """A new mask with ``count`` of the weakest active weights dropped and ``count`` connections grown."""
    if count <= 0:
        return mask.clone()
    flat_mask = mask.reshape(-1)
    drop_scores = magnitude.reshape(-1).float().masked_fill(~flat_mask, math.inf)
    dropped = torch.topk(drop_scores, count, largest=False, sorted=False).indices
    after_drop = flat_mask.clone()
    after_drop[dropped] = False
    candidates = grow_scores.reshape(-1).float().masked_fill(after_drop, -math.inf)
    grown = torch.topk(candidates, count, largest=True, sorted=False).indices
    new = after_drop
    new[grown] = True
    return new.reshape(mask.shape)


class DynamicSparsifier(Sparsifier):
    """Drop and grow on the update schedule; a subclass says where to grow (``grow_scores``)."""

    def prepare(self) -> None:
        method = self.method
        self.schedule = UpdateSchedule.build(method.update_interval, method.end_step, method.drop_fraction,
                                             method.decay, self.name)

    def start(self) -> None:
        self.apply_masks(self.initial_masks(), "random sparse init")

    def initial_masks(self) -> dict[str, torch.Tensor]:
        """A random mask with each layer's sparsity from the distribution (RigL's random init)."""
        magnitude = self.magnitude_scores()
        sparsities = self.allocate(self.target_sparsity, magnitude)
        return self.masks_from_scores(self.random_scores(self.generator(0)), sparsities, monotone_from=self.masks())

    def wants_gradients_at(self, step: int) -> bool:
        return "gradients" in self.needs and self.schedule.is_update(step)

    def grow_scores(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def update(self) -> bool:
        if not self.schedule.is_update(self.steps):
            return False
        self.rewire(self.schedule.fraction_at(self.steps), f"drop and grow ({self.schedule.fraction_at(self.steps):.3f})")
        return True

    def rewire(self, fraction: float, event: str) -> None:
        grow = self.grow_scores()
        masks = {}
        for layer in self.layers:
            count = int(fraction * layer.active)
            masks[layer.name] = drop_and_grow(layer.mask, layer.weight.detach().abs(), grow[layer.name], count)
        self.apply_masks(masks, event)
