"""One threshold across all layers: the lowest-scoring weights of the whole model go first."""

from __future__ import annotations

from typing import ClassVar

import torch

from prunekit.core.allocation.base import ALLOCATIONS, Allocation, LayerInfo, ScoreFn
from prunekit.core.masks import pruned_count


@ALLOCATIONS.register("global")
class GlobalThreshold(Allocation):
    name: ClassVar[str] = "global"
    needs: ClassVar[str] = "scores"

    def allocate(self, layers: list[LayerInfo], sparsity: float, scores: ScoreFn | None) -> dict[str, float]:
        assert scores is not None
        flat = [scores(layer.name).reshape(-1).float().cpu() for layer in layers]
        everything = torch.cat(flat)
        total = pruned_count(everything.numel(), sparsity)
        if total == 0:
            return {layer.name: 0.0 for layer in layers}
        threshold = torch.kthvalue(everything, total).values
        del everything
        below = [int((f < threshold).sum()) for f in flat]
        ties = [int((f == threshold).sum()) for f in flat]
        # Weights exactly at the threshold are shared out in layer order so the total is exact.
        remaining = total - sum(below)
        result = {}
        for layer, low, tie in zip(layers, below, ties):
            taken = min(tie, remaining)
            remaining -= taken
            result[layer.name] = (low + taken) / layer.numel
        return result
