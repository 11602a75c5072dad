"""Knapsack allocation (as ROCKET picks per-layer candidates): measure each unit's cost at each level alone,
then choose one level per unit minimising the summed cost under the global budget.

The choice is a multiple-choice knapsack, solved exactly by dynamic programming over the integer budget
(``search.LevelProblem``: units weigh whole quanta of parameters, so the removed total is an integer). The
summed cost assumes the units' costs add up, which holds only approximately: ``evolutionary`` starts from
this solution and measures whole candidates instead.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from prunekit.core.allocation.base import ALLOCATIONS
from prunekit.core.allocation.search import LevelProblem, MeasuredAllocation, SearchOutcome
from prunekit.errors import PrunekitError


def multiple_choice_knapsack(costs: Sequence[Sequence[float]], weights: Sequence[Sequence[int]],
                             target: int) -> tuple[list[int], float, int]:
    """One option per group with the least total cost among those whose total weight is exactly ``target``,
    or, when no choice reaches it exactly, the least total weight above it.

    Returns (chosen option per group, total cost, total weight). Among equally cheap choices the one with
    the lower options wins (ties are resolved in a fixed order, so the answer is reproducible).
    """
    if len(costs) != len(weights) or any(len(c) != len(w) or not c for c, w in zip(costs, weights)):
        raise ValueError("every group needs as many costs as weights, and at least one option")
    if any(w < 0 for group in weights for w in group):
        raise ValueError("weights must be non-negative")
    capacity = sum(max(group) for group in weights)
    if target > capacity:
        raise PrunekitError(f"the budget cannot be reached: even every unit at its last level removes "
                            f"{capacity} of the {target} quanta asked")
    target = max(target, 0)
    best = np.full(capacity + 1, math.inf)
    best[0] = 0.0
    choices = np.zeros((len(costs), capacity + 1), dtype=np.int32)
    for group, (group_costs, group_weights) in enumerate(zip(costs, weights)):
        new = np.full(capacity + 1, math.inf)
        for option, (cost, weight) in enumerate(zip(group_costs, group_weights)):
            shifted = np.full(capacity + 1, math.inf)
            shifted[weight:] = best[:capacity + 1 - weight] + float(cost)
            better = shifted < new  # strictly: the lower option keeps a tie
            new[better] = shifted[better]
            choices[group, better] = option
        best = new
    reachable = np.flatnonzero(np.isfinite(best[target:]))
    if reachable.size == 0:
        raise PrunekitError(f"no choice of levels removes at least {target} quanta")
    total_weight = target + int(reachable[0])
    chosen = []
    remaining = total_weight
    for group in range(len(costs) - 1, -1, -1):
        option = int(choices[group, remaining])
        chosen.append(option)
        remaining -= weights[group][option]
    chosen.reverse()
    return chosen, float(best[total_weight]), total_weight


@ALLOCATIONS.register("knapsack")
class Knapsack(MeasuredAllocation):

    def search(self, problem: LevelProblem) -> SearchOutcome:
        costs = problem.costs()
        weights = [[weight * step for step in range(problem.max_step + 1)] for weight in problem.unit_weights]
        steps, cost, _ = multiple_choice_knapsack(costs, weights, problem.target)
        return SearchOutcome(steps, predicted_cost=cost)
