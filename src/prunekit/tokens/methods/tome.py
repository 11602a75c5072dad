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
from prunekit.tokens.state import TokenState


@METHODS.register("tome")
class ToMe(TokenMethod):
    name: ClassVar[str] = "tome"
    summary: ClassVar[str] = "merge the most similar tokens (bipartite matching on keys), proportional attention"
    needs: ClassVar[frozenset[str]] = frozenset({"keys"})
    merges: ClassVar[bool] = True
    max_ratio: ClassVar[float] = 0.5
    max_ratio_inclusive: ClassVar[bool] = True
    stages: ClassVar[str] = "every"

    r: int | None = Field(None, ge=0, description="tokens merged per layer (ToMe's r); replaces ratio when given")
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

    def reduce_fast(self, step: ReductionStep) -> tuple[torch.Tensor, TokenState] | None:
        """ToMe on fixed shapes when no row is padded and the protected tokens lead every row: the same
        matching as ``reduce``, without per-row bookkeeping. Survivors come out as the protected tokens,
        the unmerged A tokens, then the B tokens."""
        state = step.state
        prefix = state.protected_prefix
        if state.padded or prefix is None:
            return None
        merges = int(step.remove[0])
        hidden = step.hidden
        batch, _, width = hidden.shape
        metric = step.attention.keys()[:, prefix:].float()
        metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        similarity = metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)
        best, partner = similarity.max(dim=-1)
        order = torch.sort(best, dim=1, descending=True, stable=True).indices
        merged_a, kept_a = order[:, :merges], order[:, merges:]
        into_b = partner.gather(1, merged_a)

        sizes = state.sizes[:, prefix:]
        weighted = hidden[:, prefix:] * sizes[..., None].to(hidden.dtype)
        tail_a, tail_b = weighted[:, ::2], weighted[:, 1::2]
        size_a, size_b = sizes[:, ::2], sizes[:, 1::2]
        expand = lambda index: index[..., None].expand(-1, -1, width)  # noqa: E731
        tail_b = tail_b.scatter_add(1, expand(into_b), tail_a.gather(1, expand(merged_a)))
        new_size_b = size_b.scatter_add(1, into_b, size_a.gather(1, merged_a))
        kept_size_a = size_a.gather(1, kept_a)
        new_sizes = torch.cat([state.sizes[:, :prefix], kept_size_a, new_size_b], dim=1)
        body = torch.cat([tail_a.gather(1, expand(kept_a)), tail_b], dim=1)
        body = body / torch.cat([kept_size_a, new_size_b], dim=1)[..., None].to(hidden.dtype)
        new_hidden = torch.cat([hidden[:, :prefix], body], dim=1)
        source_a, source_b = state.source[:, prefix:][:, ::2], state.source[:, prefix:][:, 1::2]
        new_state = TokenState(
            sizes=new_sizes,
            valid=torch.ones(new_sizes.shape, dtype=torch.bool, device=hidden.device),
            protected=state.protected[:, :1].new_zeros(new_sizes.shape).index_fill_(1, torch.arange(prefix), True),
            source=torch.cat([state.source[:, :prefix], source_a.gather(1, kept_a), source_b], dim=1),
            reduced=True, proportional=state.proportional, padded=False, merged=True, protected_prefix=prefix,
        )
        return new_hidden, new_state
