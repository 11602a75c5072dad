"""Coverage-centric coreset selection (Zheng et al. 2023, "Coverage-centric Coreset Selection for High Pruning Rates").

First drop the hardest ``hard_cut`` fraction (at high pruning rates they are mostly noise and
hurt), then cut the remaining score range into ``strata`` equal-width bins and spread the budget
over them: visiting the bins from the least to the most populated, each takes
``min(its size, remaining budget / bins left)`` examples at random. Rare score levels are kept
whole, common ones are thinned, so the subset covers the whole difficulty range.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field, PrivateAttr

from prunekit.data.base import STRATEGIES, Strategy
from prunekit.data.strategies._order import hardest_first


def stratified(hardness: np.ndarray, candidates: np.ndarray, count: int, strata: int,
               rng: np.random.Generator) -> np.ndarray:
    """CCS's budget spreading over equal-width strata of ``hardness[candidates]``."""
    values = hardness[candidates]
    low, high = float(values.min()), float(values.max())
    if high > low:
        bins = np.minimum(((values - low) / (high - low) * strata).astype(np.int64), strata - 1)
    else:
        bins = np.zeros(values.shape[0], dtype=np.int64)
    groups = [candidates[bins == b] for b in range(strata)]
    groups = sorted((g for g in groups if g.size), key=len)  # stable: equal sizes keep bin order
    chosen = []
    budget = count
    for number, group in enumerate(groups):
        take = min(group.size, budget // (len(groups) - number))
        chosen.append(rng.choice(group, size=take, replace=False))
        budget -= take
    picked = np.concatenate(chosen) if chosen else np.empty(0, dtype=np.int64)
    if budget > 0:  # cannot happen when the candidates suffice (the last bin is the largest); kept as a guard
        rest = np.setdiff1d(candidates, picked)
        picked = np.concatenate([picked, rng.choice(rest, size=budget, replace=False)])
    return picked


@STRATEGIES.register("ccs")
class CCS(Strategy):
    summary = "coverage-centric: cut the hardest `hard_cut`, then sample evenly across `strata` score bins (Zheng et al. 2023)"

    hard_cut: float = Field(0.1, ge=0, lt=1, description="fraction of all examples dropped at the hard end first "
                                                         "(the paper's beta)")
    strata: int = Field(50, ge=1)
    _cuts: list[tuple[int, int]] = PrivateAttr(default_factory=list)  # (wanted, made) per choose(), for notes()

    def choose(self, hardness: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
        total = hardness.shape[0]
        wanted = int(round(self.hard_cut * total))
        cut = min(wanted, total - count)  # never cut so much that the budget cannot be met
        self._cuts.append((wanted, cut))
        candidates = hardest_first(hardness, rng)[cut:]
        return stratified(hardness, candidates, count, self.strata, rng)

    def notes(self) -> dict:
        wanted = sum(w for w, _ in self._cuts)
        cut = sum(c for _, c in self._cuts)
        note = {"hard_examples_cut": cut}
        if cut < wanted:
            note["hard_cut_reduced"] = (f"cut {cut} instead of {wanted} hardest examples so that the kept count "
                                        "fits in the rest")
        return note
