"""EViT (Liang et al., 2022): keep the tokens the [CLS] token attends to most, fuse the rest into one.

At a reducing layer, the attention of the [CLS] query (averaged over heads) ranks the reducible
tokens. The most attended survive; the inattentive ones are fused into a single new token, their
attention-weighted mean, appended after the survivors. The count is matched to the other methods:
at a ratio removing r tokens, r + 1 tokens are fused into one. EViT as published sums the weighted
tokens without normalising, which a fine-tuned model learns to absorb; training-free, the fused
token is the normalised mean so its scale is that of a real token.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from prunekit.tokens.base import (FUSED, METHODS, Assignment, ReductionStep, Selection, TokenMethod, keep_top,
                                  with_removal)


@METHODS.register("evit")
class EViT(TokenMethod):
    name: ClassVar[str] = "evit"
    summary: ClassVar[str] = "keep the tokens [CLS] attends to most, fuse the inattentive ones into one token"
    needs: ClassVar[frozenset[str]] = frozenset({"anchor_attention"})
    merges: ClassVar[bool] = True
    needs_cls: ClassVar[bool] = True

    fuse: bool = Field(True, description="fuse the inattentive tokens into one (False: drop them)")

    def reduce(self, step: ReductionStep) -> Selection | Assignment:
        attention = step.attention.anchor_attention("first")
        if not self.fuse:
            return keep_top(attention, step)
        fusing = step.remove > 0
        # Fusing r + 1 tokens into one removes r tokens, like the other methods at the same ratio.
        attentive = keep_top(attention, with_removal(step, step.remove + fusing.long())).keep
        positions = torch.arange(attention.shape[1], device=attention.device).expand_as(attention)
        inattentive = step.reducible & ~attentive & fusing[:, None]
        dest = torch.where(inattentive, torch.full_like(positions, FUSED), positions)
        return Assignment(dest=dest, fuse_weights=attention.clamp_min(1e-12))
