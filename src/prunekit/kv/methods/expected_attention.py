"""Expected Attention (Devoto et al., 2025): the queries still to come are modelled as a Gaussian, fitted to the
prompt's queries (after its first sink tokens) and rotated to the average position of the next
``future_positions`` tokens; an entry scores the attention such a query is expected to pay it,
softmax(μ·k·s + ½ s² kᵀΣk) over the entries, times its value's norm. The sinks are kept."""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from prunekit.kv.base import METHODS, KVMethod, PrefillView


@METHODS.register("expected_attention")
class ExpectedAttention(KVMethod):
    summary: ClassVar[str] = "attention expected from the future queries' statistics, × value norm"
    future_positions: int = Field(512, ge=1, description="positions after the prompt the queries are averaged over")
    sinks: int = Field(4, ge=0, description="first tokens always kept (and left out of the query statistics)")
    covariance: bool = Field(True, description="include the queries' covariance (second-order term)")
    value_norm: bool = Field(True, description="weight by the value's L2 norm")
    epsilon: float = Field(0.0, ge=0.0, description="added to the expected attention before the value weighting")

    def window(self) -> int:
        return self.sinks + 1

    def recent_queries(self) -> int:
        return 64  # while decoding, the statistics come from the latest queries

    def protected(self, tokens: int) -> torch.Tensor:
        return torch.arange(min(self.sinks, tokens))

    def score(self, view: PrefillView) -> torch.Tensor:
        sinks = self.sinks
        after_sinks = view.query_positions >= sinks
        future = view.future_rotation(view.queries[:, :, after_sinks].float(), view.query_positions[after_sinks],
                                      self.future_positions)
        mean = future.mean(dim=2)  # (batch, heads, head_dim)
        keys = view.keys[:, :, sinks:].float()
        if view.groups > 1:
            keys = keys.repeat_interleave(view.groups, dim=1)
        # KVPress and the paper scale by 1/sqrt(head_dim); the kernel's own scale is the model's truth
        logits = torch.einsum("bhd,bhtd->bht", mean, keys) * view.scale
        if self.covariance:
            centred = future - future.mean(dim=2, keepdim=True)
            covariance = torch.einsum("bhsi,bhsj->bhij", centred, centred) / centred.shape[2]
            logits = logits + torch.einsum("bhti,bhij,bhtj->bht", keys, covariance, keys) * view.scale ** 2 / 2
        scores = view.per_key_head(torch.softmax(logits, dim=-1))
        if self.value_norm:
            scores = (scores + self.epsilon) * torch.linalg.vector_norm(view.values[:, :, sinks:].float(), dim=-1)
        return torch.nn.functional.pad(scores, (sinks, 0), value=float("inf"))
