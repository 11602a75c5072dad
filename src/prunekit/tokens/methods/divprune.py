"""DivPrune (Alvar et al., CVPR 2025): keep the most diverse subset of tokens (max-min diversity).

Keeping k of n tokens is posed as the max-min diversity problem: choose the subset whose closest
pair (cosine distance of the hidden states) is as far apart as possible. It is solved greedily:
start from the token whose nearest neighbour is farthest, then repeatedly add the token farthest
from everything chosen so far. Protected tokens are kept by rule and do not take part.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from prunekit.tokens.base import METHODS, ReductionStep, Selection, TokenMethod, cosine_similarity_matrix


def max_min_diverse(features: torch.Tensor, candidates: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """(batch, n) bool: a greedy max-min diverse choice of ``count[b]`` rows among ``candidates[b]``."""
    batch, n, _ = features.shape
    distance = 1.0 - cosine_similarity_matrix(features.float())
    outside = ~candidates[:, None, :]
    eye = torch.eye(n, dtype=torch.bool, device=features.device)[None]
    nearest = distance.masked_fill(outside | eye, float("inf")).amin(dim=-1)
    nearest = nearest.masked_fill(~candidates, float("-inf"))
    # A lone candidate has no neighbour: its nearest distance is inf, which still picks it first.
    chosen = torch.zeros(batch, n, dtype=torch.bool, device=features.device)
    closest = torch.full((batch, n), float("inf"), device=features.device)  # distance to the chosen set
    gain = nearest
    steps = int(count.max()) if count.numel() else 0
    wanted = count[:, None] > torch.arange(steps, device=features.device)[None, :]  # (batch, steps)
    excluded = ~candidates
    for picked in range(steps):
        pick = gain.argmax(dim=1, keepdim=True)
        # rows that already have their count keep their choice (writing back what is there)
        chosen.scatter_(1, pick, chosen.gather(1, pick) | wanted[:, picked:picked + 1])
        closest = torch.minimum(closest, distance.gather(1, pick[..., None].expand(-1, 1, n))[:, 0])
        gain = closest.masked_fill(excluded | chosen, float("-inf"))
    return chosen


@METHODS.register("divprune")
class DivPrune(TokenMethod):
    name: ClassVar[str] = "divprune"
    summary: ClassVar[str] = "keep the most diverse tokens (greedy max-min cosine distance of hidden states)"
    needs: ClassVar[frozenset[str]] = frozenset({"features"})

    def reduce(self, step: ReductionStep) -> Selection:
        reducible = step.reducible
        keep_count = reducible.sum(dim=1) - step.remove
        chosen = max_min_diverse(step.hidden, reducible, keep_count)
        return Selection(keep=chosen | (step.state.protected & step.state.valid))
