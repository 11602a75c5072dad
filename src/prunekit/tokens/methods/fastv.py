"""FastV (Chen et al., 2024): keep the tokens the anchor query attends to most, drop the rest.

In a decoder the anchor is the last prompt token, the query that starts generation; in an encoder
it is [CLS]. Its attention (averaged over heads) at the reducing layer ranks the tokens. FastV
prunes once, after block K (K = 2 by default), keeping a fraction (1 - ratio) of the prompt.
"""

from __future__ import annotations

from typing import ClassVar

from prunekit.tokens.base import METHODS, ReductionStep, Selection, TokenMethod, keep_top


@METHODS.register("fastv")
class FastV(TokenMethod):
    name: ClassVar[str] = "fastv"
    summary: ClassVar[str] = "keep the tokens the last query ([CLS] in encoders) attends to most; prune once"
    needs: ClassVar[frozenset[str]] = frozenset({"anchor_attention"})
    stages: ClassVar[str] = "single"

    def reduce(self, step: ReductionStep) -> Selection:
        return keep_top(step.attention.anchor_attention(step.anchor), step)
