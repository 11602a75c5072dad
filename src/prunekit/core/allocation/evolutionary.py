"""Evolutionary allocation (after EvoPress, Sieberling et al., 2024): search the level of every unit by
measuring whole candidates.

One parent (the knapsack's solution, every unit at the target level, or the problem's ``baseline``: the allocation
its command uses without a search). Each generation makes ``offspring``
mutants of it: a mutation moves one unit a step up or down and others the other way until exactly the same
number of parameters is removed (``mutate``), so every candidate meets the budget. Candidates are selected in stages
of growing cost: all of them are measured on the first stage's few calibration tokens, the best
``survivors[0]`` on the next stage's tokens, and so on; the last stage's best replaces the parent only if it
is better on the last stage's tokens, where the parent was measured too. The parent therefore never gets
worse by the search's own fitness (KL of the final logits to the dense model's).

Every random choice comes from one generator seeded by ``seed``; its state and the parent are saved after
each generation (``LevelProblem.save_state``), so an interrupted search resumes and ends as an
uninterrupted one would.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import numpy as np
from pydantic import Field, model_validator

from prunekit.core.allocation.base import ALLOCATIONS
from prunekit.core.allocation.knapsack import Knapsack
from prunekit.core.allocation.search import LevelProblem, MeasuredAllocation, SearchOutcome, uniform_steps
from prunekit.core.progress import progress_bar
from prunekit.errors import PrunekitError

_ATTEMPTS = 200  # tries to find a mutation (or a new offspring) before giving up on it


def mutate(steps: Sequence[int], weights: Sequence[int], max_step: int, rng: np.random.Generator,
           moves: int = 1) -> list[int] | None:
    """``steps`` with ``moves`` level moves, each keeping ``Σ weight · step`` unchanged; None if none was found.

    A move takes one unit a step up (or down) and randomly drawn other units each a step the other way until
    exactly as many quanta are given back. Units of different sizes trade in whole quanta: one step of a
    unit three times as large is paid by three steps of small units, and the other way round.
    """
    current = list(steps)
    count = len(current)
    for _ in range(moves):
        for _attempt in range(_ATTEMPTS):
            moved = int(rng.integers(count))
            direction = 1 if rng.random() < 0.5 else -1
            if not 0 <= current[moved] + direction <= max_step or weights[moved] == 0:
                continue
            trial = list(current)
            trial[moved] += direction
            owed = weights[moved]
            while owed > 0:
                payers = [u for u in range(count)
                          if u != moved and 0 <= trial[u] - direction <= max_step and 0 < weights[u] <= owed]
                if not payers:
                    break
                payer = payers[int(rng.integers(len(payers)))]
                trial[payer] -= direction
                owed -= weights[payer]
            if owed == 0:
                current = trial
                break
        else:
            return None
    return current


def _budget(steps: Sequence[int], weights: Sequence[int]) -> int:
    return sum(step * weight for step, weight in zip(steps, weights))


@ALLOCATIONS.register("evolutionary")
class Evolutionary(MeasuredAllocation):

    start: Literal["knapsack", "uniform", "baseline"] = Field(
        "knapsack", description="the first parent: the knapsack's solution, every unit at one level, or the "
                                "allocation the command uses without a search (prune: uniform; shrink: global, "
                                "on a grid as fine as its rounding)")
    generations: int = Field(20, ge=0)
    offspring: int = Field(8, ge=1, description="mutants of the parent per generation")
    max_moves: int = Field(3, ge=1, description="a mutant makes 1 to this many level moves")
    stage_tokens: list[int] = Field(default_factory=lambda: [512, 2048], min_length=1,
                                    description="calibration tokens measuring candidates, stage by stage")
    survivors: list[int] = Field(default_factory=lambda: [2], description="candidates kept after each stage "
                                                                          "but the last (which keeps one)")
    seed: int = 0

    @model_validator(mode="after")
    def _stages(self) -> "Evolutionary":
        if len(self.survivors) != len(self.stage_tokens) - 1:
            raise ValueError(f"survivors needs one count per stage but the last: {len(self.stage_tokens) - 1}")
        counts = [self.offspring, *self.survivors]
        if any(b > a or b < 1 for a, b in zip(counts, counts[1:])):
            raise ValueError("survivors must shrink stage by stage, from at most offspring down to at least 1")
        if any(tokens < 1 for tokens in self.stage_tokens):
            raise ValueError("stage_tokens must be positive")
        return self

    def fitness_tokens(self) -> list[int]:
        return list(self.stage_tokens)

    def starting_point(self, problem: LevelProblem) -> tuple[list[int], float | None]:
        if self.start == "knapsack":
            found = Knapsack(**{k: v for k, v in self.model_dump().items()
                                if k in MeasuredAllocation.model_fields}).search(problem)
            return found.steps, found.predicted_cost
        if self.start == "baseline":
            if not hasattr(problem, "baseline"):
                raise PrunekitError("this search has no baseline allocation to start from; start from the knapsack")
            return problem.baseline(), None
        steps = uniform_steps(problem)
        if steps is None:
            raise PrunekitError("no uniform level meets the ratio exactly on this grid; start from the knapsack")
        return steps, None

    def search(self, problem: LevelProblem) -> SearchOutcome:
        # More generations continue the same search: their count is not part of what a saved state must match.
        settings = {k: v for k, v in self.search_settings().items() if k != "generations"}
        key = {"settings": settings, "weights": list(problem.unit_weights), "target": problem.target}
        saved = problem.load_state()
        if saved is not None and saved.get("key") == key:
            state = saved
            rng = np.random.default_rng()
            rng.bit_generator.state = state["rng"]
            predicted = state.get("predicted_cost")
        else:
            start, predicted = self.starting_point(problem)
            last = problem.stages() - 1
            state = {"key": key, "generation": 0, "start": start, "parent": start,
                     "start_fitness": problem.fitness(last, start), "evaluations": 1, "curve": [],
                     "predicted_cost": predicted}
            state["parent_fitness"] = state["start_fitness"]
            state["curve"].append({"generation": 0, "fitness": state["parent_fitness"], "evaluations": 1})
            rng = np.random.default_rng(self.seed)
            state["rng"] = rng.bit_generator.state
            problem.save_state(state)
        with progress_bar("Evolutionary search", self.generations) as bar:
            bar.advance(state["generation"])
            while state["generation"] < self.generations:
                self._generation(problem, state, rng)
                state["rng"] = rng.bit_generator.state
                problem.save_state(state)
                bar.describe(f"Evolutionary search (best KL {state['parent_fitness']:.5f})")
                bar.advance()
        return SearchOutcome(list(state["parent"]), fitness=state["parent_fitness"], predicted_cost=predicted,
                             start_steps=list(state["start"]), start_fitness=state["start_fitness"],
                             curve=list(state["curve"]), evaluations=state["evaluations"])

    def _offspring(self, problem: LevelProblem, parent: list[int], rng: np.random.Generator) -> list[list[int]]:
        seen = {tuple(parent)}
        children: list[list[int]] = []
        for _ in range(self.offspring * _ATTEMPTS):
            if len(children) == self.offspring:
                break
            moves = int(rng.integers(1, self.max_moves + 1))
            child = mutate(parent, problem.unit_weights, problem.max_step, rng, moves)
            if child is not None and tuple(child) not in seen:
                seen.add(tuple(child))
                children.append(child)
        return children

    def _generation(self, problem: LevelProblem, state: dict[str, Any], rng: np.random.Generator) -> None:
        parent = list(state["parent"])
        candidates = self._offspring(problem, parent, rng)
        budget = _budget(parent, problem.unit_weights)
        assert all(_budget(c, problem.unit_weights) == budget for c in candidates)
        last = problem.stages() - 1
        keep = [*self.survivors, 1]
        fitness: list[float] = []
        for stage in range(last + 1):
            if not candidates:
                break
            fitness = [problem.fitness(stage, candidate) for candidate in candidates]
            state["evaluations"] += len(candidates)
            order = sorted(range(len(candidates)), key=lambda i: (fitness[i], i))[:keep[stage]]
            candidates = [candidates[i] for i in order]
            fitness = [fitness[i] for i in order]
        state["generation"] += 1
        if candidates and fitness[0] < state["parent_fitness"]:
            state["parent"], state["parent_fitness"] = candidates[0], fitness[0]
        state["curve"].append({"generation": state["generation"], "fitness": state["parent_fitness"],
                               "evaluations": state["evaluations"]})
