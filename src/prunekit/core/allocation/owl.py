"""OWL (Yin et al., 2024): outlier-weighted layer-wise sparsity.

A block's outlier ratio D is the share of its Wanda scores |W|·‖X‖ above M times their mean.
Ratios are rescaled to a range of width 2λ and centred on the target density, so blocks with
more outliers keep more weights while the average sparsity stays on target.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from prunekit.core.allocation.base import ALLOCATIONS, Allocation, LayerInfo, ScoreFn


@ALLOCATIONS.register("owl")
class OWL(Allocation):
    needs: ClassVar[frozenset[str]] = frozenset({"activations"})

    threshold_m: float = Field(5.0, gt=0, description="a score is an outlier above M × the block mean")
    lambda_: float = Field(0.08, ge=0, lt=0.5, alias="lambda", description="half-width of the sparsity range")

    def outlier_ratios(self, layers: list[LayerInfo], scores: ScoreFn) -> dict[int, float]:
        blocks: dict[int, list[LayerInfo]] = {}
        for layer in layers:
            if layer.block is not None and layer.block >= 0:
                blocks.setdefault(layer.block, []).append(layer)
        ratios = {}
        for block, members in sorted(blocks.items()):
            values = torch.cat([scores(layer.name).reshape(-1).float() for layer in members])
            ratios[block] = float((values > self.threshold_m * values.mean()).float().mean())
        return ratios

    def allocate(self, layers: list[LayerInfo], sparsity: float, scores: ScoreFn | None) -> dict[str, float]:
        assert scores is not None
        ratios = self.outlier_ratios(layers, scores)
        block_sparsity = {}
        if ratios:
            values = torch.tensor(list(ratios.values()), dtype=torch.float64)
            spread = values.max() - values.min()
            if spread > 0:
                scaled = (values - values.min()) / spread * (2 * self.lambda_)
            else:
                scaled = torch.zeros_like(values)
            density = scaled - scaled.mean() + (1 - sparsity)
            block_sparsity = {block: float(min(max(1 - d, 0.0), 0.99)) for block, d in zip(ratios, density.tolist())}
        return {layer.name: block_sparsity.get(layer.block, sparsity) for layer in layers}
