"""Unstructured sparsity of cached keys and values (Mustafar, Joo et al., 2025), with its memory counted honestly.

Each cached key and value vector (one token, one key head) loses the given fraction of its entries, those of
smallest magnitude: per-token pruning, which Mustafar found to hold accuracy for both keys and values. A dense
tensor with zeros holds exactly the bytes it held before; the saving exists only in a sparse format. So two
sizes are reported: the bytes the cache's tensors hold (``held_bytes``) and the bytes the same entries would take
as a bitmap (one bit per entry) plus the nonzero values (``sparse_bytes``).
"""

from __future__ import annotations

from typing import Any

import torch


def magnitude_prune(vectors: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Zero the ``sparsity`` fraction of each vector's entries (along the last axis) of smallest magnitude."""
    width = vectors.shape[-1]
    drop = int(width * sparsity)
    if drop == 0:
        return vectors
    smallest = vectors.abs().topk(drop, dim=-1, largest=False).indices
    return vectors.scatter(-1, smallest, 0.0)


def held_bytes(cache: Any) -> int:
    """Bytes the cache's key and value tensors hold."""
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def sparse_bytes(cache: Any) -> int:
    """Bytes the cache's keys and values would take as a bitmap of their nonzeros plus the nonzero values."""
    total = 0
    for layer in cache.layers:
        for tensor in (layer.keys, layer.values):
            total += (tensor.numel() + 7) // 8 + int(torch.count_nonzero(tensor)) * tensor.element_size()
    return total
