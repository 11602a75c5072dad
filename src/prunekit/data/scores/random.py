"""Random scores: the baseline every other score must beat. Seeded by the scoring seed."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from prunekit.data.base import HIGHER, SCORES, Score


@SCORES.register("random")
@dataclass
class Random(Score):
    name = "random"
    summary = "uniform random numbers from the scoring seed (the baseline)"
    harder = HIGHER
    needs_labels = False

    def uses_proxy(self, context) -> bool:
        return False

    def compute(self, context) -> np.ndarray:
        return np.random.default_rng(context.seed).random(context.count)
