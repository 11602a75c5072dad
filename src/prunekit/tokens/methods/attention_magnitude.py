"""Attention-magnitude baseline: keep the tokens that receive the most attention.

A token's score is the attention it receives, averaged over heads and over the real queries that
can see it (all of them in an encoder; those at or after it under a causal mask, so early tokens
are not favoured merely for being visible to more queries).
"""

from __future__ import annotations

from typing import ClassVar

from prunekit.tokens.base import METHODS, ReductionStep, Selection, TokenMethod, keep_top


@METHODS.register("attention-magnitude")
class AttentionMagnitude(TokenMethod):
    name: ClassVar[str] = "attention-magnitude"
    summary: ClassVar[str] = "baseline: keep the tokens receiving the most attention (mean over heads and queries)"
    needs: ClassVar[frozenset[str]] = frozenset({"attention"})

    def reduce(self, step: ReductionStep) -> Selection:
        return keep_top(step.attention.received(), step)
