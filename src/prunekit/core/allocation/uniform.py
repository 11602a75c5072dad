"""Every layer gets the target sparsity."""

from __future__ import annotations


from prunekit.core.allocation.base import ALLOCATIONS, Allocation, LayerInfo, ScoreFn


@ALLOCATIONS.register("uniform")
class Uniform(Allocation):

    def allocate(self, layers: list[LayerInfo], sparsity: float, scores: ScoreFn | None) -> dict[str, float]:
        return {layer.name: sparsity for layer in layers}
