"""Random scores: the baseline every other score must beat. Seeded by the scoring seed."""

from __future__ import annotations

import numpy as np

from prunekit.data.base import HIGHER, SCORES, Score


@SCORES.register("random")
class Random(Score):
    summary = "uniform random numbers from the scoring seed (the baseline)"
    harder = HIGHER

    def compute(self, context) -> np.ndarray:
        return np.random.default_rng(context.seed).random(context.count)
