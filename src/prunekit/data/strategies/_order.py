"""Ranking helper shared by the strategies."""

from __future__ import annotations

import numpy as np


def hardest_first(hardness: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Positions from hardest to easiest; ties broken at random (seeded), not by row order.

    Integer scores (forgetting counts) tie massively; breaking ties by row order would prefer
    the first rows of the file.
    """
    return np.lexsort((rng.permutation(hardness.shape[0]), -hardness))
