"""ToMe (Bolya et al., 2023): bipartite soft matching on attention keys, merging r tokens per layer.

Reducible tokens alternate between two sets A and B (by their order among reducible tokens, so
protected tokens and padding never shift the split). Every A token finds its most similar B token
(cosine of the keys averaged over heads); the r best-matched A tokens are averaged into their B
partners, weighted by token size. Later layers use proportional attention (log size added to the
attention logits), so a merged token still counts as many tokens in attention.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from prunekit.tokens.base import METHODS, Assignment, ReductionStep, TokenMethod, cosine_similarity_matrix


@METHODS.register("tome")
class ToMe(TokenMethod):
    name: ClassVar[str] = "tome"
    summary: ClassVar[str] = "merge the most similar tokens (bipartite matching on keys), proportional attention"
    needs: ClassVar[frozenset[str]] = frozenset({"keys"})
    merges: ClassVar[bool] = True
    max_rate: ClassVar[float] = 0.5
    max_rate_inclusive: ClassVar[bool] = True
    stages: ClassVar[str] = "every"

    r: int | None = Field(None, ge=0, description="tokens merged per layer (ToMe's r); replaces rate when given")
    proportional: bool = Field(True, description="add log(token size) to the attention logits of later layers")

    def uses_proportional_attention(self) -> bool:
        return self.proportional

    def removal_counts(self, reducible: torch.Tensor, layer: int) -> torch.Tensor:
        # Bipartite matching can merge at most every A token: half of the reducible tokens.
        limit = reducible // 2
        wanted = super().removal_counts(reducible, layer) if self.r is None else torch.full_like(reducible, self.r)
        return torch.minimum(wanted, limit)

    def reduce(self, step: ReductionStep) -> Assignment:
        reducible = step.reducible
        rank = torch.cumsum(reducible.long(), dim=1) - 1
        in_a = reducible & (rank % 2 == 0)
        in_b = reducible & (rank % 2 == 1)
        similarity = cosine_similarity_matrix(step.attention.keys().float())
        similarity = similarity.masked_fill(~in_b[:, None, :], float("-inf"))
        best, partner = similarity.max(dim=-1)
        best = best.masked_fill(~in_a, float("-inf"))
        order = torch.sort(best, dim=1, descending=True, stable=True).indices
        position = torch.empty_like(order)
        position.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
        merge = in_a & (position < step.remove[:, None])
        own = torch.arange(reducible.shape[1], device=reducible.device).expand_as(partner)
        return Assignment(dest=torch.where(merge, partner, own))
