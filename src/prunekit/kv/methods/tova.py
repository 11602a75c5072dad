"""TOVA (Oren et al., 2024): the last token's attention, averaged over every head, ranks the entries; every key
head keeps the same positions, and the last token itself."""

from __future__ import annotations

from typing import ClassVar

import torch

from prunekit.kv.base import METHODS, KVMethod, PrefillView


@METHODS.register("tova")
class TOVA(KVMethod):
    summary: ClassVar[str] = "the last token's attention, averaged over heads"

    def window(self) -> int:
        return 1

    def score(self, view: PrefillView) -> torch.Tensor:
        attention = view.window_attention(1)[:, :, 0, :-1].mean(dim=1, keepdim=True)  # (batch, 1, tokens - 1)
        scores = attention.expand(-1, view.keys.shape[1], -1)
        return torch.nn.functional.pad(scores, (0, 1), value=float("inf"))
