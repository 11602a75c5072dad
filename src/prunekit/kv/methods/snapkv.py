"""SnapKV (Li et al., 2024): the prompt's last queries (the observation window) vote for the entries they
attend to; votes are pooled over neighbouring positions so kept entries bring their context. Each key head
ranks by the mean vote of its query heads; the window itself is always kept."""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field, field_validator

from prunekit.kv.base import METHODS, KVMethod, PrefillView, pool_scores


@METHODS.register("snapkv")
class SnapKV(KVMethod):
    summary: ClassVar[str] = "the observation window's pooled attention votes"
    window_size: int = Field(64, ge=1, description="the prompt's last queries that vote (always kept)")
    kernel_size: int = Field(5, ge=1, description="positions a vote is pooled over (odd)")

    @field_validator("kernel_size")
    @classmethod
    def _odd(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError("kernel_size must be odd, so the pooling is centred on each position")
        return value

    def window(self) -> int:
        return self.window_size

    def score(self, view: PrefillView) -> torch.Tensor:
        attention = view.window_attention(self.window_size)  # (batch, heads, window, tokens)
        votes = attention.mean(dim=2)[..., : view.tokens - self.window_size]
        votes = view.per_key_head(pool_scores(votes, self.kernel_size))
        return torch.nn.functional.pad(votes, (0, self.window_size), value=float("inf"))
