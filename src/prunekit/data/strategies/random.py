"""Keep a uniform random subset (the baseline; the score is ignored)."""

from __future__ import annotations

import numpy as np

from prunekit.data.base import STRATEGIES, Strategy


@STRATEGIES.register("random")
class RandomSubset(Strategy):
    summary = "keep a uniform random subset from the selection seed (ignores the score)"

    def choose(self, hardness: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
        return rng.permutation(hardness.shape[0])[:count]
