"""Train with a fixed mask: the model's current zeros (a one-shot-pruned model), or given masks.

This is recovery fine-tuning's sparsifier: every weight that is zero when it is built (or masked
out in ``masks``) stays exactly zero for the whole run, whatever the optimizer does. A weight that
happens to be exactly zero in a dense model is frozen at zero too, which is what "keep the mask"
means when the mask is only known through the zeros.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.training.base import Sparsifier
from prunekit.training.method import SPARSIFIERS, SparseTrainingMethod


@SPARSIFIERS.register("fixed")
class FixedMaskMethod(SparseTrainingMethod):
    """No settings: the mask is the model's own zeros, or ``masks`` given when it is created."""

    needs = frozenset({"mask"})

    def create(self, model: nn.Module, sparsity: float | None = None, distribution: Any = None,
               **provided: Any) -> "FixedMask":
        if sparsity is not None or distribution is not None:
            raise PrunekitError(f"{self.name} keeps the mask the model has; it takes no sparsity or distribution")
        return FixedMask(model, method=self, **provided)


class FixedMask(Sparsifier):
    method_class = FixedMaskMethod

    def __init__(self, model: nn.Module, masks: Mapping[str, torch.Tensor] | None = None, **common: Any):
        self.given_masks = masks
        super().__init__(model, 0.0, "uniform", **common)

    def start(self) -> None:
        masks = self.given_masks
        if masks is None:
            chosen = {layer.name: layer.mask & (layer.weight.detach() != 0) for layer in self.layers}
        else:
            unknown = sorted(set(masks) - {layer.name for layer in self.layers})
            if unknown:
                raise PrunekitError(f"{self.name}: no sparsified layer is called {unknown[0]}")
            chosen = {}
            for layer in self.layers:
                given = masks.get(layer.name, layer.mask)
                if tuple(given.shape) != layer.shape:
                    raise PrunekitError(f"{self.name}: the mask for {layer.name} has shape {tuple(given.shape)}, "
                                        f"the weight {layer.shape}")
                chosen[layer.name] = layer.mask & given.to(layer.mask.device, torch.bool)
        self.given_masks = None
        self.apply_masks(chosen, "fix mask")
        self.target_sparsity = self.sparsity
