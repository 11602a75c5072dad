"""SNIP (Lee et al., 2019): connection sensitivity |∂L/∂w · w| on a batch at initialisation.

Global by default, as in the paper: one threshold over all layers' sensitivities.
"""

from __future__ import annotations

import torch

from prunekit.training.at_init import DataScored, DataScoredMethod
from prunekit.training.method import SPARSIFIERS


@SPARSIFIERS.register("snip")
class SNIPMethod(DataScoredMethod):
    """SNIP's settings: how many batches of the given data it scores on."""


class SNIP(DataScored):
    method_class = SNIPMethod

    def compute_scores(self) -> dict[str, torch.Tensor]:
        with self.differentiable() as params:
            grads = [torch.zeros_like(p) for p in params]
            for batch in self.data:
                for total, grad in zip(grads, torch.autograd.grad(self.loss(batch), params)):
                    total += grad
        return {layer.name: (grad * layer.weight.detach()).abs() for layer, grad in zip(self.layers, grads)}
