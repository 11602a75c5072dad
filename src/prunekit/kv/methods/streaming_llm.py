"""StreamingLLM (Xiao et al., 2023): keep the first tokens (the attention sinks) and the most recent ones."""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from prunekit.kv.base import METHODS, KVMethod, PrefillView


@METHODS.register("streaming_llm")
class StreamingLLM(KVMethod):
    summary: ClassVar[str] = "baseline: the first sink tokens and the most recent ones"
    sinks: int = Field(4, ge=0, description="first tokens always kept (attention sinks)")

    def protected(self, tokens: int) -> torch.Tensor:
        return torch.arange(min(self.sinks, tokens))

    def score(self, view: PrefillView) -> torch.Tensor:
        batch, heads, tokens, _ = view.keys.shape
        recency = torch.arange(tokens, dtype=torch.float32, device=view.keys.device)
        return recency.expand(batch, heads, tokens)
