"""VATP (Guo et al., 2024): attention alone misses that an entry's contribution scales with its value, so the
observation window's attention received is weighted by the value's L1 norm."""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from prunekit.kv.base import METHODS, KVMethod, PrefillView


@METHODS.register("vatp")
class VATP(KVMethod):
    summary: ClassVar[str] = "window attention received × value L1 norm"
    window_size: int = Field(64, ge=1, description="the prompt's last queries whose attention is counted (kept)")
    sinks: int = Field(4, ge=0, description="first tokens always kept: their huge attention is a sink, not meaning")

    def window(self) -> int:
        return self.window_size

    def protected(self, tokens: int) -> torch.Tensor:
        return torch.arange(min(self.sinks, tokens))

    def score(self, view: PrefillView) -> torch.Tensor:
        received = view.per_key_head(view.window_attention(self.window_size).mean(dim=2))
        scores = received * view.values.float().abs().sum(dim=-1)
        scores[..., view.tokens - self.window_size:] = float("inf")
        return scores
