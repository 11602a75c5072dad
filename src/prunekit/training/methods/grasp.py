"""GraSP (Wang et al., 2020): keep the weights that preserve gradient flow after pruning.

GraSP removes the weights with the largest S(−θ) = −θ ⊙ Hg, where g is the gradient and H the
Hessian of the loss, computed as Hg = ∇(gᵀ∇L) with g held fixed (a Hessian-vector product).
The keep-score here is therefore θ ⊙ Hg (signed; higher = keep). Logits are divided by a
temperature of 200 as in the authors' code. Global by default, as in the paper.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from pydantic import Field

from prunekit.training.at_init import DataScored, DataScoredMethod, classification_loss
from prunekit.training.method import SPARSIFIERS


@SPARSIFIERS.register("grasp")
class GraSPMethod(DataScoredMethod):
    """GraSP's settings: the batches it scores on and the temperature dividing the logits."""

    temperature: float = Field(200.0, gt=0)


class GraSP(DataScored):
    method_class = GraSPMethod
    signed_scores = True

    def loss(self, batch: Any) -> torch.Tensor:
        if self.loss_fn is not None:
            return self.loss_fn(self.model, batch)
        return partial(classification_loss, temperature=self.method.temperature)(self.model, batch)

    def compute_scores(self) -> dict[str, torch.Tensor]:
        with self.differentiable() as params:
            gradient = [torch.zeros_like(p) for p in params]
            for batch in self.data:
                for total, grad in zip(gradient, torch.autograd.grad(self.loss(batch), params)):
                    total += grad
            hessian_gradient = [torch.zeros_like(p) for p in params]
            for batch in self.data:
                grads = torch.autograd.grad(self.loss(batch), params, create_graph=True)
                inner = sum((g * fixed).sum() for g, fixed in zip(grads, gradient))
                for total, hg in zip(hessian_gradient, torch.autograd.grad(inner, params)):
                    total += hg
        return {layer.name: layer.weight.detach() * hg for layer, hg in zip(self.layers, hessian_gradient)}
