"""How many of a prompt's cached entries each key head keeps (the allocation), and which.

``uniform``: every key head of every block keeps ``max(1, ⌊tokens·(1 - ratio)⌋)`` entries, its best-scored.
``adaptive`` (Ada-KV, Feng et al., 2024): a block's heads share the same total, spent on the best scores across
them, so a head whose attention is spread keeps more than a head that attends to a few entries; each head first
keeps a ``safeguard`` fraction of its uniform budget. Heads then hold different counts: the cache stores each
head's entries padded to the longest head, and the padding is masked out of every later attention.
``pyramid`` (PyramidKV, Cai et al., 2024): the budget is spread over the *blocks* instead, early blocks (whose
attention is broad) keeping more than late ones (whose attention has narrowed onto a few entries): per head,
``(1 + taper)`` times the uniform count in the first block falling linearly to ``(1 - taper)`` times it in the last,
the total over blocks that of ``uniform``. Each block holds its own count, without padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from prunekit.kv.base import kept_count

Allocation = Literal["uniform", "adaptive", "pyramid"]
ALLOCATIONS = ("uniform", "adaptive", "pyramid")


@dataclass
class Selection:
    """``positions`` (batch, key_heads, kept): the kept entries' prompt positions, ascending per head; ``valid``
    marks real entries (None: all are; otherwise padding slots are False and hold position -1)."""

    positions: torch.Tensor
    valid: torch.Tensor | None = None

    def entries(self) -> int:
        return int(self.valid.sum()) if self.valid is not None else self.positions.numel()


def _rank_order(scores: torch.Tensor) -> torch.Tensor:
    """Indices by descending score along the last axis; ties go to the earlier position, so a selection is
    reproducible."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices


def select(scores: torch.Tensor, ratio: float, allocation: str = "uniform", safeguard: float = 0.2,
           protected: torch.Tensor | None = None, keep: int | None = None) -> Selection:
    """The entries to keep from (batch, key_heads, tokens) scores (higher keeps; ``protected`` positions always):
    ``kept_count(tokens, ratio)`` per head, or ``keep`` when given."""
    batch, heads, tokens = scores.shape
    ranked = scores.float().clone()
    if protected is not None and protected.numel():
        ranked[..., protected.to(ranked.device)] = float("inf")
    keep = kept_count(tokens, ratio) if keep is None else min(keep, tokens)
    if allocation == "uniform":
        positions = _rank_order(ranked)[..., :keep]
        return Selection(torch.sort(positions, dim=-1).values)
    safe = max(1, int(keep * safeguard)) if safeguard > 0 else 0
    order = _rank_order(ranked)
    kept = torch.zeros(batch, heads, tokens, dtype=torch.bool, device=scores.device)
    kept.scatter_(-1, order[..., :safe], True)
    # the rest of the block's budget goes to the best remaining scores across its heads
    remaining = ranked.masked_fill(kept, float("-inf")).reshape(batch, heads * tokens)
    extra = heads * (keep - safe)
    chosen = _rank_order(remaining)[:, :extra]
    kept.view(batch, heads * tokens).scatter_(-1, chosen, True)
    counts = kept.sum(dim=-1)
    longest = int(counts.max())
    # kept positions first (ascending), then the rest, so the first ``count`` slots of a head are its entries
    key = torch.arange(tokens, device=scores.device).expand(batch, heads, tokens) + (~kept) * tokens
    positions = torch.sort(key, dim=-1).values[..., :longest]
    valid = torch.arange(longest, device=scores.device) < counts[..., None]
    if bool(valid.all()):
        return Selection(positions)
    return Selection(positions.masked_fill(~valid, -1), valid)


def layer_budgets(keep: int, tokens: int, layers: int, taper: float) -> list[int]:
    """Entries per head for each of ``layers`` blocks (in order) under the ``pyramid`` allocation: a line from
    ``(1 + taper)·keep`` down to ``(1 - taper)·keep``, each in [1, tokens], summing to ``layers · keep`` exactly
    (the uniform total), the rounding given to the blocks whose line value was cut most."""
    if not 0.0 <= taper < 1.0:
        raise ValueError(f"taper {taper:g} is outside [0, 1)")
    total = layers * keep
    if layers == 1:
        return [keep]
    line = [keep * (1.0 + taper * (1.0 - 2.0 * index / (layers - 1))) for index in range(layers)]
    budgets = [min(tokens, max(1, int(value))) for value in line]
    # Hand out (or take back) single entries, largest shortfall first, until the total is exact: the line's
    # rounding and any clamping at the prompt's length move to the blocks with room.
    while sum(budgets) != total:
        short = sum(budgets) < total
        movable = [index for index in range(layers) if (budgets[index] < tokens if short else budgets[index] > 1)]
        if not movable:
            break
        index = max(movable, key=lambda i: (line[i] - budgets[i]) if short else (budgets[i] - line[i]))
        budgets[index] += 1 if short else -1
    return budgets
