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
from typing import Any, Mapping

import torch
from torch import nn

from prunekit.training.base import Sparsifier
from prunekit.training.schedules import UpdateSchedule


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
    default_distribution = "erk"

    def __init__(self, model: nn.Module, sparsity: float, distribution: str | Mapping[str, Any] | None = None, *,
                 end_step: int, update_interval: int = 100, drop_fraction: float = 0.3, decay: str = "cosine",
                 **common: Any):
        self.schedule = UpdateSchedule.build(update_interval, end_step, drop_fraction, decay, self.name)
        super().__init__(model, sparsity, distribution, **common)
        self.record("start")
        self.apply_masks(self.initial_masks(), "random sparse init")

    def initial_masks(self) -> dict[str, torch.Tensor]:
        """A random mask with each layer's sparsity from the distribution (RigL's random init)."""
        magnitude = self.magnitude_scores()
        sparsities = self.allocate(self.target_sparsity, magnitude)
        return self.masks_from_scores(self.random_scores(self.generator(0)), sparsities, monotone_from=self.masks())

    def settings(self) -> dict:
        return self.schedule.to_dict()

    def wants_gradients_at(self, step: int) -> bool:
        return self.needs_gradients and self.schedule.is_update(step)

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
