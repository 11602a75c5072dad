"""Zero-TPrune (Wang et al., CVPR 2024): importance from the attention graph, then similarity pruning.

I-stage: the attention matrix of each head is a graph whose edge i -> j carries the attention
query i pays key j. Weighted PageRank spreads importance along it: starting uniform over the real
tokens, s <- s P (a token is important if important tokens attend to it), iterated, then averaged
over heads. S-stage: the surviving reducible tokens are split by importance into the more
important half and the rest; a token of the rest that closely resembles (cosine of keys averaged
over heads) some important token is redundant, and the most redundant are pruned.

Of each step's removals, ``importance_share`` are decided by importance alone (I-stage) and the
rest by redundancy (S-stage); once the less important half is exhausted, further removals take
the least important of the important half. The paper's head refinements (emphasising informative
regions, filtering heads by variance) are not implemented.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from prunekit.tokens.base import (METHODS, ReductionStep, Selection, TokenMethod, cosine_similarity_matrix,
                                  keep_top, with_removal)


def weighted_pagerank(probabilities: torch.Tensor, valid: torch.Tensor, iterations: int) -> torch.Tensor:
    """(batch, tokens) importance: the per-head power iteration s <- s P from uniform over real tokens,
    averaged over heads. Every real query's row sums to one, so the total importance stays one."""
    start = valid.to(probabilities.dtype)
    score = (start / start.sum(dim=1, keepdim=True).clamp_min(1.0))[:, None, None, :]  # (batch, 1, 1, tokens)
    score = score.expand(-1, probabilities.shape[1], -1, -1)
    for _ in range(iterations):
        score = score @ probabilities
    return score[:, :, 0].mean(dim=1) * valid


def _rank_within(scores: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """Rank (0 = highest score) of every member among the members of its row; non-members get n."""
    ranked = scores.masked_fill(~members, float("-inf"))
    order = torch.sort(ranked, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return torch.where(members, rank, scores.shape[1])


@METHODS.register("zero-tprune")
class ZeroTPrune(TokenMethod):
    name: ClassVar[str] = "zero-tprune"
    summary: ClassVar[str] = "weighted PageRank importance over the attention graph, then prune tokens redundant with important ones"
    needs: ClassVar[frozenset[str]] = frozenset({"attention", "keys"})

    iterations: int = Field(30, ge=1, le=1000, description="power iterations of weighted PageRank")
    importance_share: float = Field(0.5, ge=0.0, le=1.0,
                                    description="fraction of each step's removals chosen by importance alone")

    def importance(self, step: ReductionStep) -> torch.Tensor:
        return weighted_pagerank(step.attention.probabilities(), step.state.valid, self.iterations)

    def reduce(self, step: ReductionStep) -> Selection:
        importance = self.importance(step)
        by_importance = torch.round(step.remove.double() * self.importance_share).long()
        first = keep_top(importance, with_removal(step, by_importance)).keep
        candidates = first & step.reducible
        rank = _rank_within(importance, candidates)
        important = candidates & (rank < (candidates.sum(dim=1, keepdim=True) + 1) // 2)
        similarity = cosine_similarity_matrix(step.attention.keys().float())
        redundancy = similarity.masked_fill(~important[:, None, :], float("-inf")).amax(dim=-1).clamp(-1.0, 1.0)
        # Keep score: important tokens rank by importance (0..1) above the rest, whose most redundant
        # (closest to an important token) come last; tokens the I-stage removed come after everything.
        keep_score = torch.where(important, importance.float(), -2.0 - redundancy)
        keep_score = keep_score.masked_fill(step.reducible & ~first, float("-inf"))
        return keep_top(keep_score, step)
