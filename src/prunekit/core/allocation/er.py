"""ER (Mocanu et al., 2018, SET): a layer's density scales with (n_in + n_out) / (n_in · n_out).

Small layers stay denser than large ones. For convolutions only the channel counts count (the
kernel size is ignored); ERK (``erk.py``) adds the kernel dimensions. Layers that the scaling
would make denser than dense are kept dense and the remaining budget is shared again.
"""

from __future__ import annotations

import math

from pydantic import Field

from prunekit.core.allocation.base import ALLOCATIONS, Allocation, LayerInfo, ScoreFn
from prunekit.errors import PrunekitError


def scaled_densities(layers: list[LayerInfo], sparsity: float, raw: dict[str, float],
                     dense: set[str], what: str) -> dict[str, float]:
    """Densities ``min(1, ε · raw)`` with ε chosen so the kept weights match ``sparsity`` overall.

    Layers in ``dense`` are dense from the start; a layer whose ε · raw exceeds 1 joins them and
    ε is solved again (the loop of Evci et al.'s RigL code), so the total stays exact.
    """
    dense = set(dense)
    total = sum(layer.numel for layer in layers)
    kept_budget = (1.0 - sparsity) * total
    while True:
        sparse_layers = [layer for layer in layers if layer.name not in dense]
        budget = kept_budget - sum(layer.numel for layer in layers if layer.name in dense)
        if not sparse_layers:
            if budget < -0.5:
                raise PrunekitError(f"{what}: sparsity {sparsity} cannot be reached with the dense layers kept dense")
            return {layer.name: 0.0 for layer in layers}
        if budget <= 0:
            raise PrunekitError(f"{what}: sparsity {sparsity} cannot be reached: the layers kept dense already "
                                "hold more weights than the target allows")
        divisor = sum(raw[layer.name] * layer.numel for layer in sparse_layers)
        epsilon = budget / divisor
        largest = max(raw[layer.name] for layer in sparse_layers)
        if epsilon * largest <= 1.0:
            break
        dense.update(layer.name for layer in sparse_layers if math.isclose(raw[layer.name], largest))
    return {layer.name: 0.0 if layer.name in dense else min(max(1.0 - epsilon * raw[layer.name], 0.0), 1.0)
            for layer in layers}


def first_layers(layers: list[LayerInfo], keep_first_dense: bool) -> set[str]:
    return {layers[0].name} if keep_first_dense and layers else set()


@ALLOCATIONS.register("er")
class ErdosRenyi(Allocation):

    dense_first_layer: bool = Field(False, description="keep the first layer (in model order) dense")

    def raw_density(self, layer: LayerInfo) -> float:
        if len(layer.shape) < 2:
            raise PrunekitError(f"allocation {self.name}: layer {layer.name} has shape {layer.shape}; "
                                "ER needs (out, in, ...) weights")
        n_out, n_in = layer.shape[0], layer.shape[1]
        return (n_in + n_out) / (n_in * n_out)

    def allocate(self, layers: list[LayerInfo], sparsity: float, scores: ScoreFn | None) -> dict[str, float]:
        raw = {layer.name: self.raw_density(layer) for layer in layers}
        return scaled_densities(layers, sparsity, raw, first_layers(layers, self.dense_first_layer), self.name)
