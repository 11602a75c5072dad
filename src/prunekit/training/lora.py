"""LoRA whose merge keeps the zeros: the low-rank update lives inside the masked weight.

A plain LoRA (as in ``peft``) adds ``B·A·x`` beside the frozen layer, so the trained function uses
a dense update and merging it would fill the pruned positions (or, masked after the fact, change
the function that was trained). Here the update is a parametrization of the weight itself,
``W' = (W + (α/r)·B·A) ⊙ M``: training sees exactly the sparse weight it will get, and the merge
(``merge_lora``) bakes ``W'`` in with every pruned position exactly zero.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from prunekit.core.masks import get_mask
from prunekit.errors import PrunekitError


class MaskedLoRA(nn.Module):
    """The parametrization ``W -> (W + scaling · B @ A) ⊙ mask`` with trainable A (r × in) and B (out × r)."""

    def __init__(self, mask: torch.Tensor, rank: int, alpha: float, generator: torch.Generator | None = None):
        super().__init__()
        out_features, in_features = mask.shape
        self.rank = rank
        self.scaling = alpha / rank
        self.register_buffer("mask", mask.to(torch.bool), persistent=True)
        lora_a = torch.empty(rank, in_features)
        # the usual LoRA init: A like a linear layer's weight, B zero, so training starts at W ⊙ M
        bound = 1 / math.sqrt(in_features)
        lora_a.uniform_(-bound, bound, generator=generator)
        self.lora_A = nn.Parameter(lora_a.to(mask.device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=mask.device))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        delta = (self.lora_B @ self.lora_A) * self.scaling
        return torch.where(self.mask, weight + delta.to(weight.dtype), torch.zeros((), dtype=weight.dtype,
                                                                                    device=weight.device))


def attach_masked_lora(model: nn.Module, layers: dict[str, nn.Module], rank: int = 16, alpha: float = 32.0,
                       seed: int = 0) -> list[nn.Parameter]:
    """Freeze every parameter of ``model`` and give each of ``layers`` a masked LoRA; return its parameters.

    A layer's mask is its current zeros (and its ``WeightMask``, if one is attached, which this replaces).
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise PrunekitError(f"LoRA rank must be a positive whole number, got {rank!r}")
    if not alpha > 0:
        raise PrunekitError(f"LoRA alpha must be positive, got {alpha!r}")
    generator = torch.Generator().manual_seed(seed)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    trainable: list[nn.Parameter] = []
    for name, module in layers.items():
        weight = module.weight.detach()
        if weight.dim() != 2:
            raise PrunekitError(f"LoRA needs a 2-D weight; {name} has shape {tuple(weight.shape)}")
        mask = weight != 0
        existing = get_mask(module)
        if existing is not None:
            mask &= existing.mask
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        elif parametrize.is_parametrized(module, "weight"):
            raise PrunekitError(f"{name} already carries a parametrization prunekit does not know; remove it first")
        lora = MaskedLoRA(mask, min(rank, min(weight.shape)), alpha, generator)
        parametrize.register_parametrization(module, "weight", lora)
        module.parametrizations["weight"].original.requires_grad_(False)
        trainable += [lora.lora_A, lora.lora_B]
    return trainable


def merge_lora(model: nn.Module) -> int:
    """Bake every masked LoRA into its weight (pruned positions stay exactly 0); returns how many."""
    merged = 0
    for module in list(model.modules()):
        if not parametrize.is_parametrized(module, "weight"):
            continue
        if any(isinstance(p, MaskedLoRA) for p in module.parametrizations["weight"]):
            with torch.no_grad():
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
            merged += 1
    return merged
