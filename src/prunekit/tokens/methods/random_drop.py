"""Random baseline: keep a seeded random subset of the reducible tokens.

Each seed and layer fix a random ranking of the original token positions; every sequence keeps its
best-ranked reducible tokens. The choice therefore depends only on the seed and on the sequence
itself, never on which other sequences share its batch or how the batch is padded.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from prunekit.tokens.base import METHODS, ReductionStep, Selection, TokenMethod, keep_top


@METHODS.register("random")
class RandomDrop(TokenMethod):
    name: ClassVar[str] = "random"
    summary: ClassVar[str] = "baseline: keep a seeded random subset of the tokens"

    def reduce(self, step: ReductionStep) -> Selection:
        source = step.state.source
        seed = step.generator.initial_seed() * 1_000_003 + step.layer
        # torch's CPU generator yields the same prefix for any length, so the table is batch-independent.
        table = torch.rand(int(source.max()) + 1, generator=torch.Generator().manual_seed(seed))
        scores = table.to(source.device)[source.clamp_min(0)]
        return keep_top(scores, step)
