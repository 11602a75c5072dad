"""One-shot magnitude pruning, then training with the mask kept: the "prune a trained model and
fine-tune" baseline (Han et al., 2015). Prunes when built; global magnitude by default."""

from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from prunekit.training.base import SPARSIFIERS, Sparsifier


@SPARSIFIERS.register("magnitude")
class OneShotMagnitude(Sparsifier):
    name = "magnitude"
    default_distribution = "global"

    def __init__(self, model: nn.Module, sparsity: float, distribution: str | Mapping[str, Any] | None = None,
                 **common: Any):
        super().__init__(model, sparsity, distribution, **common)
        self.record("start")
        scores = self.magnitude_scores()
        masks = self.masks_from_scores(scores, self.allocate(self.target_sparsity, scores), monotone_from=self.masks())
        self.apply_masks(masks, "prune")
