"""The measured allocations' algorithms on synthetic problems: the knapsack against brute force, mutations that keep
the budget, and an evolution that is seeded, resumable and never worse than its start."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prunekit.core.allocation import LayerInfo, get_allocation
from prunekit.core.allocation.evolutionary import mutate
from prunekit.core.allocation.knapsack import multiple_choice_knapsack
from prunekit.errors import PrunekitError


@st.composite
def knapsack_instances(draw):
    groups = draw(st.integers(1, 4))
    options = draw(st.integers(1, 4))
    costs = [[draw(st.integers(0, 20)) / 4 for _ in range(options)] for _ in range(groups)]
    weights = [[draw(st.integers(0, 6)) for _ in range(options)] for _ in range(groups)]
    target = draw(st.integers(0, sum(max(w) for w in weights)))
    return costs, weights, target


@settings(max_examples=300, deadline=None)
@given(knapsack_instances())
def test_knapsack_is_exact_against_brute_force(instance):
    costs, weights, target = instance
    feasible = {}
    for choice in itertools.product(*[range(len(c)) for c in costs]):
        weight = sum(weights[g][o] for g, o in enumerate(choice))
        if weight >= target:
            cost = sum(costs[g][o] for g, o in enumerate(choice))
            feasible.setdefault(weight, []).append(cost)
    lightest = min(feasible)  # exactly the target when reachable, else the least weight above it
    chosen, cost, weight = multiple_choice_knapsack(costs, weights, target)
    assert weight == lightest
    assert sum(weights[g][o] for g, o in enumerate(chosen)) == weight
    assert cost == pytest.approx(sum(costs[g][o] for g, o in enumerate(chosen)))
    assert cost == pytest.approx(min(feasible[lightest]))


def test_knapsack_refuses_an_unreachable_budget():
    with pytest.raises(PrunekitError, match="cannot be reached"):
        multiple_choice_knapsack([[0.0, 1.0]], [[0, 2]], 3)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=2, max_size=8), st.integers(0, 2**32 - 1), st.integers(1, 4))
def test_mutations_keep_the_budget_exact(weights, seed, moves):
    rng = np.random.default_rng(seed)
    max_step = 5
    steps = [int(s) for s in rng.integers(0, max_step + 1, len(weights))]
    mutant = mutate(steps, weights, max_step, rng, moves)
    if mutant is None:
        return
    assert sum(w * s for w, s in zip(weights, mutant)) == sum(w * s for w, s in zip(weights, steps))
    assert all(0 <= s <= max_step for s in mutant)


class Synthetic:
    """Units whose true fitness couples neighbours (so the knapsack's additive costs are not exact), measured with
    a small, stage-dependent bias as fewer tokens would be."""

    def __init__(self, weights=(1, 3, 1, 3, 1, 3), max_step=4, ratio_steps=2):
        self.unit_names = [f"u{i}" for i in range(len(weights))]
        self.unit_weights = list(weights)
        self.max_step = max_step
        self.target = ratio_steps * sum(weights)
        rng = np.random.default_rng(7)
        self.scale = rng.uniform(0.5, 2.0, len(weights))
        self.state = None
        self.evaluations = 0

    def true(self, steps):
        s = np.asarray(steps, dtype=float)
        return float((self.scale * s ** 2).sum() + 0.3 * (s[:-1] * s[1:]).sum())

    def costs(self):
        return [[float(self.scale[u] * s ** 2) for s in range(self.max_step + 1)] for u in range(len(self.unit_weights))]

    def fitness(self, stage, steps):
        self.evaluations += 1
        bias = 0.0 if stage == 1 else 0.05 * sum(i * s for i, s in enumerate(steps))
        return self.true(steps) + bias

    def stages(self):
        return 2

    def load_state(self):
        return self.state

    def save_state(self, state):
        import json

        self.state = json.loads(json.dumps(state))  # what a file would give back


EVOLUTION = {"name": "evolutionary", "generations": 12, "offspring": 4, "stage_tokens": [8, 16], "survivors": [2]}


def test_evolution_is_seeded_and_never_worse_than_its_start():
    first = get_allocation(EVOLUTION).search(Synthetic())
    again = get_allocation(EVOLUTION).search(Synthetic())
    other = get_allocation({**EVOLUTION, "seed": 1}).search(Synthetic())
    assert first.steps == again.steps and first.curve == again.curve
    assert first.fitness <= first.start_fitness
    assert all(b["fitness"] <= a["fitness"] for a, b in zip(first.curve, first.curve[1:]))
    assert first.fitness < first.start_fitness  # on this problem the additive costs miss the coupling
    assert other.curve != first.curve
    problem = Synthetic()
    assert sum(w * s for w, s in zip(problem.unit_weights, first.steps)) == problem.target


def test_evolution_resumes_where_it_stopped():
    whole_problem = Synthetic()
    whole = get_allocation(EVOLUTION).search(whole_problem)
    problem = Synthetic()
    get_allocation({**EVOLUTION, "generations": 5}).search(problem)  # stopped after 5 generations
    assert problem.state["generation"] == 5
    first_part = problem.evaluations
    resumed = get_allocation(EVOLUTION).search(problem)  # the same search, continued to 12
    assert resumed.steps == whole.steps and resumed.curve == whole.curve
    assert problem.evaluations == whole_problem.evaluations  # nothing measured twice
    assert problem.evaluations > first_part
    changed = Synthetic()
    changed.state = problem.state
    restarted = get_allocation({**EVOLUTION, "offspring": 3}).search(changed)  # another search: starts over
    assert restarted.curve[0]["generation"] == 0 and len(restarted.curve) == 13


def test_uniform_start_and_knapsack_start():
    uniform = get_allocation({**EVOLUTION, "start": "uniform", "generations": 0}).search(Synthetic())
    assert uniform.steps == [2] * 6 and uniform.fitness == uniform.start_fitness
    knapsack = get_allocation({"name": "knapsack"}).search(Synthetic())
    problem = Synthetic()
    assert sum(w * s for w, s in zip(problem.unit_weights, knapsack.steps)) == problem.target
    assert knapsack.predicted_cost <= sum(problem.costs()[u][2] for u in range(6))


def test_measured_allocations_return_given_levels_and_refuse_to_guess():
    layers = [LayerInfo("a", (4, 4), 0), LayerInfo("b", (4, 4), 0)]
    assert get_allocation({"name": "knapsack", "levels": {"a": 0.2, "b": 0.6}}).allocate(layers, 0.4, None) == \
        {"a": 0.2, "b": 0.6}
    with pytest.raises(PrunekitError, match="measures the model"):
        get_allocation("knapsack").allocate(layers, 0.4, None)
    with pytest.raises(PrunekitError, match="no ratio for b"):
        get_allocation({"name": "evolutionary", "levels": {"a": 0.2}}).allocate(layers, 0.4, None)
    with pytest.raises(PrunekitError, match="survivors"):
        get_allocation({"name": "evolutionary", "stage_tokens": [8, 16, 32], "survivors": [2]})
    assert get_allocation({"name": "knapsack", "step": 0.25, "max_ratio": 0.75}).grid() == [0.0, 0.25, 0.5, 0.75]
