"""SynFlow (Tanaka et al., 2020): iterative, data-free synaptic-flow pruning at initialisation.

Every weight is replaced by its absolute value and an all-ones input is fed through the network;
R = Σ outputs. A weight's score is |θ ⊙ ∂R/∂θ|. Pruning is repeated ``iterations`` times, the
density shrinking exponentially (d^(k/n) at iteration k), so no layer collapses. Only the input's
shape is used, never its values, so the mask is the same for any data. Scoring runs on a float64
copy of the model in eval mode (the paper's choice against overflow); the model is not touched.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

import torch
from pydantic import Field, field_validator
from torch import nn

from prunekit.core.masks import get_mask
from prunekit.errors import PrunekitError
from prunekit.training.at_init import AtInitialization
from prunekit.training.method import SPARSIFIERS, SparseTrainingMethod, TrainingRun


@SPARSIFIERS.register("synflow")
class SynFlowMethod(SparseTrainingMethod):
    """SynFlow's settings: its iterations and the shape of one input (or give an ``example_input``)."""

    default_distribution = "global"
    needs = frozenset({"input_shape"})

    iterations: int = Field(100, ge=1)
    input_shape: tuple[int, ...] | None = Field(None, description="one input's shape, without the batch dimension")

    @field_validator("input_shape")
    @classmethod
    def _positive(cls, shape: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if shape is not None and (not shape or any(size < 1 for size in shape)):
            raise ValueError(f"input_shape must be positive sizes, got {shape}")
        return shape

    @classmethod
    def settings_for(cls, run: TrainingRun, given: Mapping[str, Any]) -> dict[str, Any]:
        return {"input_shape": run.input_shape, **given}


class SynFlow(AtInitialization):
    method_class = SynFlowMethod

    def __init__(self, model: nn.Module, sparsity: float, distribution: str | Mapping[str, Any] | None = None, *,
                 example_input: torch.Tensor | None = None, **common: Any):
        self.example_input = example_input
        super().__init__(model, sparsity, distribution, **common)

    def prepare(self) -> None:
        shape, example = self.method.input_shape, self.example_input
        if (shape is None) == (example is None):
            raise PrunekitError(f"{self.name}: give the shape of one input (input_shape) or an example_input")
        if example is not None:
            if not torch.is_tensor(example) or not example.is_floating_point():
                raise PrunekitError(f"{self.name} feeds an all-ones input, so the model must take float inputs "
                                    "(images, features), not token ids")
            shape = tuple(example.shape[1:])
        self.input_shape = tuple(int(size) for size in shape)
        self.example_input = None  # only its shape is used

    def derived_settings(self) -> dict:
        return {"input_shape": list(self.input_shape)}

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
        for iteration in range(1, self.method.iterations + 1):
            with torch.enable_grad():
                flow = shadow(ones).sum()
                grads = torch.autograd.grad(flow, originals)
            scores = {layer.name: (grad * shadow.get_submodule(layer.name).weight.detach()).abs()
                      for layer, grad in zip(self.layers, grads)}
            if not all(torch.isfinite(s).all() for s in scores.values()):
                raise PrunekitError(f"{self.name}: the synaptic flow overflowed even in float64; "
                                    "the model is too deep for SynFlow")
            step_sparsity = 1.0 - density ** (iteration / self.method.iterations)
            masks = self.masks_from_scores(scores, self.allocate(step_sparsity, scores), monotone_from=masks)
            with torch.no_grad():
                for name, mask in masks.items():
                    shadow_masks[name].mask.copy_(mask)
        return masks
