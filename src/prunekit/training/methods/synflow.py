"""SynFlow (Tanaka et al., 2020): iterative, data-free synaptic-flow pruning at initialisation.

Every weight is replaced by its absolute value and an all-ones input is fed through the network;
R = Σ outputs. A weight's score is |θ ⊙ ∂R/∂θ|. Pruning is repeated ``iterations`` times, the
density shrinking exponentially (d^(k/n) at iteration k), so no layer collapses. Only the input's
shape is used, never its values, so the mask is the same for any data. Scoring runs on a float64
copy of the model in eval mode (the paper's choice against overflow); the model is not touched.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from prunekit.core.masks import get_mask
from prunekit.errors import PrunekitError
from prunekit.training.at_init import AtInitialization
from prunekit.training.base import SPARSIFIERS, check_positive_int


@SPARSIFIERS.register("synflow")
class SynFlow(AtInitialization):
    name = "synflow"

    def __init__(self, model: nn.Module, sparsity: float, distribution: str | Mapping[str, Any] | None = None, *,
                 input_shape: Sequence[int] | None = None, example_input: torch.Tensor | None = None,
                 iterations: int = 100, **common: Any):
        if (input_shape is None) == (example_input is None):
            raise PrunekitError(f"{self.name}: give the shape of one input (input_shape) or an example_input")
        if example_input is not None:
            if not torch.is_tensor(example_input) or not example_input.is_floating_point():
                raise PrunekitError(f"{self.name} feeds an all-ones input, so the model must take float inputs "
                                    "(images, features), not token ids")
            input_shape = tuple(example_input.shape[1:])
        shape = tuple(int(size) for size in input_shape)
        if not shape or any(size < 1 for size in shape):
            raise PrunekitError(f"{self.name}: input_shape must be positive sizes, got {tuple(input_shape)}")
        self.input_shape = shape
        self.iterations = check_positive_int(iterations, f"{self.name}: iterations")
        super().__init__(model, sparsity, distribution, **common)

    def settings(self) -> dict:
        return {"iterations": self.iterations, "input_shape": list(self.input_shape)}

    def initial_masks(self) -> dict[str, torch.Tensor]:
        shadow = copy.deepcopy(self.model).double().eval()
        with torch.no_grad():
            for tensor in shadow.state_dict().values():
                if tensor.is_floating_point():
                    tensor.abs_()
        shadow_masks = {layer.name: get_mask(shadow.get_submodule(layer.name)) for layer in self.layers}
        originals = [shadow.get_submodule(layer.name).parametrizations["weight"].original for layer in self.layers]
        for parameter in shadow.parameters():
            parameter.requires_grad_(False)
        for original in originals:
            original.requires_grad_(True)
        device = originals[0].device
        ones = torch.ones((1, *self.input_shape), dtype=torch.float64, device=device)
        masks = {name: m.mask.clone() for name, m in shadow_masks.items()}  # existing masks stay
        density = 1.0 - self.target_sparsity
        for iteration in range(1, self.iterations + 1):
            with torch.enable_grad():
                flow = shadow(ones).sum()
                grads = torch.autograd.grad(flow, originals)
            scores = {layer.name: (grad * shadow.get_submodule(layer.name).weight.detach()).abs()
                      for layer, grad in zip(self.layers, grads)}
            if not all(torch.isfinite(s).all() for s in scores.values()):
                raise PrunekitError(f"{self.name}: the synaptic flow overflowed even in float64; "
                                    "the model is too deep for SynFlow")
            step_sparsity = 1.0 - density ** (iteration / self.iterations)
            masks = self.masks_from_scores(scores, self.allocate(step_sparsity, scores), monotone_from=masks)
            with torch.no_grad():
                for name, mask in masks.items():
                    shadow_masks[name].mask.copy_(mask)
        return masks
