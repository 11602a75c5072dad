"""One threshold across all layers: the lowest-scoring weights of the whole model go first."""

from __future__ import annotations

from typing import ClassVar, Iterable

import torch

from prunekit.core.allocation.base import ALLOCATIONS, Allocation, LayerInfo, ScoreFn
from prunekit.core.masks import pruned_count

_BINS = 1 << 16


def _bits(scores: torch.Tensor) -> torch.Tensor:
    """Non-negative float32 scores as int32 bit patterns, which sort exactly like the floats."""
    values = scores.detach().float().abs().contiguous().reshape(-1).cpu()
    return values.view(torch.int32)


def kth_smallest(scores: ScoreFn, names: Iterable[str], k: int) -> torch.Tensor:
    """The k-th smallest (1-based) of all scores of all layers, exactly, in two streaming passes.

    A radix selection on the float bits (high 16 bits, then low 16 bits): memory stays at two
    histograms however large the model, and each layer's scores are produced one at a time.
    """
    names = list(names)
    high = torch.zeros(_BINS, dtype=torch.int64)
    for name in names:
        high += torch.bincount(_bits(scores(name)) >> 16, minlength=_BINS)
    cumulative = high.cumsum(0)
    top = int(torch.searchsorted(cumulative, torch.tensor(k)))
    below = int(cumulative[top - 1]) if top > 0 else 0
    low = torch.zeros(_BINS, dtype=torch.int64)
    for name in names:
        bits = _bits(scores(name))
        low += torch.bincount(bits[(bits >> 16) == top] & 0xFFFF, minlength=_BINS)
    bottom = int(torch.searchsorted(low.cumsum(0), torch.tensor(k - below)))
    return torch.tensor([(top << 16) | bottom], dtype=torch.int32).view(torch.float32)[0]


@ALLOCATIONS.register("global")
class GlobalThreshold(Allocation):
    needs: ClassVar[frozenset[str]] = frozenset({"scores"})

    def allocate(self, layers: list[LayerInfo], sparsity: float, scores: ScoreFn | None) -> dict[str, float]:
        assert scores is not None
        total = pruned_count(sum(layer.numel for layer in layers), sparsity)
        if total == 0:
            return {layer.name: 0.0 for layer in layers}
        threshold = kth_smallest(scores, [layer.name for layer in layers], total)
        counts = []
        for layer in layers:
            values = scores(layer.name).detach().float().abs()
            counts.append((int((values < threshold).sum()), int((values == threshold).sum())))
        # Weights exactly at the threshold are shared out in layer order so the total is exact.
        remaining = total - sum(below for below, _ in counts)
        result = {}
        for layer, (below, ties) in zip(layers, counts):
            taken = min(ties, remaining)
            remaining -= taken
            result[layer.name] = (below + taken) / layer.numel
        return result
