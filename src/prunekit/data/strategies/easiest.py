"""Keep the easiest examples (what helps when data are scarce or noisy; Sorscher et al. 2022)."""

from __future__ import annotations

import numpy as np

from prunekit.data.base import STRATEGIES, Strategy
from prunekit.data.strategies._order import hardest_first


@STRATEGIES.register("easiest")
class Easiest(Strategy):
    summary = "keep the lowest-hardness examples"

    def choose(self, hardness: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
        return hardest_first(-hardness, rng)[:count]
