"""Keep a band of consecutive ranks: skip the hardest ``start`` fraction, then keep the next examples.

The Data Diet's offset experiments and the middle-perplexity band of "When Less is More" (Marion
et al. 2023); the default centres the band, dropping equal numbers from both ends.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field, PrivateAttr

from prunekit.data.base import STRATEGIES, Strategy
from prunekit.data.strategies._order import hardest_first


@STRATEGIES.register("middle")
class Middle(Strategy):
    summary = "keep a band of ranks after skipping the hardest `start` fraction (default: a centred band)"

    start: float = Field(-1.0, le=1, description="fraction of all examples skipped at the hard end; "
                                                "negative: centre the band")
    _skipped: int = PrivateAttr(0)  # what the last choose() skipped, for notes()

    def choose(self, hardness: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
        total = hardness.shape[0]
        skip = (total - count) // 2 if self.start < 0 else int(round(self.start * total))
        skip = min(skip, total - count)
        self._skipped = skip
        return hardest_first(hardness, rng)[skip:skip + count]

    def notes(self) -> dict:
        return {"skipped_hardest": self._skipped}
