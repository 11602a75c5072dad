"""Keep a band of consecutive ranks: skip the hardest ``start`` fraction, then keep the next examples.

The Data Diet's offset experiments and the middle-perplexity band of "When Less is More" (Marion
et al. 2023); the default centres the band, dropping equal numbers from both ends.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from prunekit.data.base import STRATEGIES, Strategy
from prunekit.data.strategies._order import hardest_first
from prunekit.errors import PrunekitError


@STRATEGIES.register("middle")
@dataclass
class Middle(Strategy):
    name = "middle"
    summary = "keep a band of ranks after skipping the hardest `start` fraction (default: a centred band)"

    start: float = -1.0  # fraction of all examples skipped at the hard end; negative: centre the band

    def __post_init__(self) -> None:
        if self.start > 1:
            raise PrunekitError(f"middle start must be a fraction in [0, 1] (negative: centred), got {self.start}")
        self._skipped = 0

    def choose(self, hardness: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
        total = hardness.shape[0]
        skip = (total - count) // 2 if self.start < 0 else int(round(self.start * total))
        skip = min(skip, total - count)
        self._skipped = skip
        return hardest_first(hardness, rng)[skip:skip + count]

    def notes(self) -> dict:
        return {"skipped_hardest": self._skipped}
