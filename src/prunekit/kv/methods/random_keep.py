"""Random baseline: every key head keeps a seeded random subset of the prompt's entries.

The ranking of a position depends on the seed, the block and the key head only, never on the batch.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from prunekit.kv.base import METHODS, KVMethod, PrefillView


@METHODS.register("random")
class RandomKeep(KVMethod):
    summary: ClassVar[str] = "baseline: a seeded random subset per key head"
    deterministic: ClassVar[bool] = False

    def score(self, view: PrefillView) -> torch.Tensor:
        batch, heads, tokens, _ = view.keys.shape
        generator = torch.Generator().manual_seed(view.seed * 1_000_003 + view.layer)
        # the CPU generator draws the same prefix for any length, so a position's score ignores the prompt's length
        table = torch.rand(heads, tokens, generator=generator)
        return table.to(view.keys.device).expand(batch, heads, tokens)
