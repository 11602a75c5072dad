"""Layer-wise sparsity allocation: how much of each layer to remove for a target overall sparsity."""

from prunekit.core.allocation.base import ALLOCATIONS, Allocation, LayerInfo, apply_overrides, get_allocation

__all__ = ["ALLOCATIONS", "Allocation", "LayerInfo", "apply_overrides", "get_allocation"]
