"""ERK (Evci et al., 2020, RigL): ER with the kernel, density ∝ (Σ dims / Π dims) ** power.

For a convolution of shape (out, in, kh, kw) the density scales with
(out + in + kh + kw) / (out · in · kh · kw); for a linear layer it equals ER. ``power`` < 1
flattens the differences between layers (RigL's ``erk_power_scale``).
"""

from __future__ import annotations


from pydantic import Field

from prunekit.core.allocation.base import ALLOCATIONS, Allocation, LayerInfo, ScoreFn
from prunekit.core.allocation.er import first_layers, scaled_densities


@ALLOCATIONS.register("erk")
class ErdosRenyiKernel(Allocation):

    dense_first_layer: bool = Field(False, description="keep the first layer (in model order) dense")
    power: float = Field(1.0, ge=0.0, le=1.0, description="exponent of the raw ERK scale; 0 is uniform")

    def raw_density(self, layer: LayerInfo) -> float:
        return (sum(layer.shape) / layer.numel) ** self.power

    def allocate(self, layers: list[LayerInfo], sparsity: float, scores: ScoreFn | None) -> dict[str, float]:
        raw = {layer.name: self.raw_density(layer) for layer in layers}
        return scaled_densities(layers, sparsity, raw, first_layers(layers, self.dense_first_layer), self.name)
