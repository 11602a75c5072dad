"""LAMP (Lee et al., 2021): layer-adaptive magnitude pruning through a rescaled, global score.

Within a layer, sort the squared scores ascending; the LAMP score of the weight at position u is
its squared score divided by the sum of squared scores of every weight at u or later. Ranking
these scores across all layers with one threshold gives each layer its sparsity; every layer
keeps at least its largest weight (LAMP score 1). With magnitude scores this is the paper's LAMP.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from prunekit.core.allocation.base import ALLOCATIONS, Allocation, LayerInfo, ScoreFn
from prunekit.core.allocation.global_threshold import GlobalThreshold


def lamp_scores(scores: torch.Tensor) -> torch.Tensor:
    """LAMP scores shaped like ``scores``: ``s_u² / Σ_{v ≥ u} s_v²`` in ascending order of ``s²``."""
    squared = scores.detach().reshape(-1).double() ** 2
    ordered, order = torch.sort(squared)
    # suffix sums: the sum of every squared score at or after each sorted position
    suffix = torch.flip(torch.cumsum(torch.flip(ordered, [0]), 0), [0])
    lamp_sorted = torch.where(suffix > 0, ordered / suffix.clamp_min(torch.finfo(torch.float64).tiny),
                              torch.zeros_like(ordered))
    result = torch.empty_like(squared)
    result[order] = lamp_sorted
    return result.reshape(scores.shape)


@ALLOCATIONS.register("lamp")
class LAMP(Allocation):
    needs: ClassVar[frozenset[str]] = frozenset({"scores"})

    def allocate(self, layers: list[LayerInfo], sparsity: float, scores: ScoreFn | None) -> dict[str, float]:
        assert scores is not None
        rescaled = {layer.name: lamp_scores(scores(layer.name)) for layer in layers}
        return GlobalThreshold().allocate(layers, sparsity, lambda name: rescaled[name])
