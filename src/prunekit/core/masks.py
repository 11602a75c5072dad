"""Keep-masks (True = keep) built from scores, and masks attached to modules as parametrizations.

Every pruning dimension that removes individual weights goes through these functions, so the
exact count of pruned weights and the validity of N:M groups are decided in one place.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from prunekit.core.patterns import SparsityPattern


def pruned_count(total: int, sparsity: float) -> int:
    """How many of ``total`` units a sparsity removes: rounded to nearest, never all of them."""
    count = int(sparsity * total + 0.5)
    return min(max(count, 0), total - 1 if total > 0 else 0)


def _mask_dropping_lowest(scores: torch.Tensor, count: int, dim: int | None) -> torch.Tensor:
    mask = torch.ones_like(scores, dtype=torch.bool)
    if count <= 0:
        return mask
    if dim is None:
        flat = scores.reshape(-1)
        drop = torch.topk(flat, count, largest=False, sorted=False).indices
        mask.view(-1)[drop] = False
        return mask
    drop = torch.topk(scores, count, dim=dim, largest=False, sorted=False).indices
    mask.scatter_(dim, drop, False)
    return mask


def keep_mask_per_row(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Drop the same number of lowest scores in every output row (Wanda's comparison group)."""
    return _mask_dropping_lowest(scores, pruned_count(scores.shape[-1], sparsity), dim=-1)


def keep_mask_per_tensor(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Drop the lowest scores of the whole tensor."""
    return _mask_dropping_lowest(scores, pruned_count(scores.numel(), sparsity), dim=None)


def keep_mask_nm(scores: torch.Tensor, pattern: SparsityPattern) -> torch.Tensor:
    """Keep the ``n`` highest scores in each group of ``m`` consecutive inputs of every row."""
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // pattern.m, pattern.m)
    keep = torch.topk(groups, pattern.n, dim=-1, sorted=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(-1, keep, True)
    return mask.reshape(rows, cols)


def keep_mask(scores: torch.Tensor, sparsity: float, pattern: SparsityPattern, per_row: bool) -> torch.Tensor:
    if pattern.is_nm:
        return keep_mask_nm(scores, pattern)
    return keep_mask_per_row(scores, sparsity) if per_row else keep_mask_per_tensor(scores, sparsity)


def is_valid_nm(mask: torch.Tensor, pattern: SparsityPattern) -> bool:
    rows, cols = mask.shape
    if cols % pattern.m:
        return False
    per_group = mask.reshape(rows, cols // pattern.m, pattern.m).sum(-1)
    return bool((per_group <= pattern.n).all())


def sparsity_of(tensor: torch.Tensor) -> float:
    return 1.0 - float(torch.count_nonzero(tensor)) / max(tensor.numel(), 1)


class WeightMask(nn.Module):
    """A parametrization: the module's forward, its gradients and its state see ``weight * mask``."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool), persistent=True)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        return weight


def attach_mask(module: nn.Module, mask: torch.Tensor, name: str = "weight") -> WeightMask:
    """Mask ``module.<name>``; a mask already attached is replaced in place (no stacking)."""
    existing = get_mask(module, name)
    if existing is not None:
        existing.mask.copy_(mask.to(existing.mask.device, torch.bool))
        return existing
    parametrization = WeightMask(mask.to(getattr(module, name).device))
    parametrize.register_parametrization(module, name, parametrization)
    return parametrization


def get_mask(module: nn.Module, name: str = "weight") -> WeightMask | None:
    if not parametrize.is_parametrized(module, name):
        return None
    for item in module.parametrizations[name]:
        if isinstance(item, WeightMask):
            return item
    return None


def squash_masks(model: nn.Module) -> int:
    """Bake every attached mask into its weight (zeros stay zeros) and remove the parametrizations."""
    squashed = 0
    for module in list(model.modules()):
        if not parametrize.is_parametrized(module):
            continue
        for name in list(module.parametrizations.keys()):
            if any(isinstance(p, WeightMask) for p in module.parametrizations[name]):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
                squashed += 1
    return squashed


def apply_keep_mask_(weight: torch.Tensor, mask: torch.Tensor) -> None:
    """Zero pruned weights in place."""
    with torch.no_grad():
        weight.masked_fill_(~mask, 0)
