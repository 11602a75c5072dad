"""Keep the hardest examples (the Data Diet recipe: drop the easy ones)."""

from __future__ import annotations

import numpy as np

from prunekit.data.base import STRATEGIES, Strategy
from prunekit.data.strategies._order import hardest_first


@STRATEGIES.register("hardest")
class Hardest(Strategy):
    summary = "keep the highest-hardness examples"

    def choose(self, hardness: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
        return hardest_first(hardness, rng)[:count]
