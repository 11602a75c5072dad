"""Allocations found by measuring the model: the shared settings and what a search is given.

A measured allocation (``knapsack``, ``evolutionary``) chooses one *level* (a ratio on a grid, 0, 0.1, ...,
0.9 by default) for every *unit* (a group of layers compressed together). It cannot run on shapes and scores
alone: it needs the compressed model measured against the dense one, which only a dimension's pipeline can
provide (``prunekit.weights.search`` for weights). That pipeline builds a ``LevelProblem`` and hands it to
``MeasuredAllocation.search``; the algorithms here (the knapsack, the evolution) see nothing but the problem,
so they stay pure and testable on their own.

The budget is kept in integer *steps*: a unit of weight ``w`` at step ``s`` removes ``s · step · w · quantum``
parameters, so ``Σ w_u · s_u`` fixes the number of parameters removed; every solution keeps it equal to the
problem's ``target`` (exactly the requested ratio when the grid can reach it).

Once found, the levels are stored per layer in the allocation's own ``levels`` setting; an allocation that
carries its levels simply returns them, so a written recipe reproduces the model without searching again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol, Sequence

from pydantic import Field, field_validator, model_validator

from prunekit.core.allocation.base import Allocation, LayerInfo, ScoreFn
from prunekit.core.patterns import check_sparsity
from prunekit.errors import PrunekitError

_MAX_QUANTA = 200_000  # budget cells of the knapsack's table: beyond, unit sizes are rounded to coarser quanta
MEASUREMENT = "measurement"  # what a measured allocation needs: the compressed model measured against the dense one


class LevelProblem(Protocol):
    """What a search sees: units with integer budget weights, a grid of steps, and measurements of candidates."""

    unit_names: list[str]
    unit_weights: list[int]  # parameters of each unit in budget quanta
    max_step: int  # the last level of the grid
    target: int  # Σ weight · step every solution must reach exactly

    def costs(self) -> list[list[float]]:
        """Per unit and step: what moving that unit alone to that step costs, from the problem's base model (the
        dense one, where step 0 costs 0; or a compressed one, whose own step costs 0 and others may cost less)."""

    def fitness(self, stage: int, steps: Sequence[int]) -> float:
        """Lower is better: the divergence of the model compressed to ``steps`` from the dense one, measured on
        the calibration tokens of selection ``stage`` (0 the fewest)."""

    def stages(self) -> int:
        """How many selection stages the fitness offers."""

    def baseline(self) -> list[int]:
        """The steps of the dimension's allocation without a search (the evolution's ``baseline`` start); raises
        ``PrunekitError`` when it does not lie on the grid."""

    def load_state(self) -> dict | None:
        """A search's saved state (to resume), or None."""

    def save_state(self, state: dict) -> None:
        """Keep a search's state so an interrupted search continues where it stopped."""


@dataclass
class SearchOutcome:
    """The chosen step per unit and how the search got there."""

    steps: list[int]
    fitness: float | None = None  # the search's own measure of its solution (None: the knapsack's sum of costs)
    predicted_cost: float | None = None  # the knapsack's sum of per-unit costs
    start_steps: list[int] | None = None
    start_fitness: float | None = None
    curve: list[dict[str, Any]] = field(default_factory=list)  # {"generation", "fitness", "evaluations"}
    evaluations: int = 0


class MeasuredAllocation(Allocation):
    """Settings shared by the allocations that measure the model (see the module docstring)."""

    needs: ClassVar[frozenset[str]] = frozenset({MEASUREMENT})

    levels: dict[str, float] | None = Field(None, description="layer -> ratio found by an earlier search; "
                                                              "given, no search runs")
    step: float = Field(0.1, gt=0, le=0.5, description="spacing of the ratio grid")
    max_ratio: float = Field(0.9, gt=0, lt=1, description="the highest ratio a unit may get")
    unit: Literal["sublayer", "layer", "block"] = Field(
        "sublayer", description="what shares one level: a block's attention or its MLP (sublayer), every linear "
                                "layer (layer, slow), or a whole block")
    sensitivity: Literal["kl", "reconstruction"] = Field(
        "kl", description="a unit's cost: KL(dense || compressed) of the final logits with only that unit "
                          "compressed, or the relative error of its block's output (a cheaper proxy)")
    sensitivity_tokens: int = Field(512, ge=1, description="calibration tokens measuring each unit's cost")
    database: str | None = Field(None, description="directory of the level database [default: the user cache]")
    database_stream: Literal["auto", "dense", "reference"] = Field(
        "auto", description="weight pruning: the calibration inputs the level database prunes every layer from: "
                            "the dense model's, or those the model gives it with every earlier layer pruned at "
                            "the ratio uniformly (reference); auto: reference for a method that updates the kept "
                            "weights (SparseGPT), dense otherwise (prunekit.weights.search.database)")
    sequential_check: bool | None = Field(
        None, description="weight pruning: after the search, prune the model sequentially at the search's start "
                          "(the knapsack's: the uniform ratio) and at the found levels, measure both on the last "
                          "stage's tokens and keep the better [default: with the reference stream]")

    @field_validator("levels")
    @classmethod
    def _levels(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is None:
            return None
        return {name: check_sparsity(ratio, f"level of '{name}'") for name, ratio in value.items()}

    @model_validator(mode="after")
    def _grid(self) -> "MeasuredAllocation":
        if self.max_ratio < self.step - 1e-12:
            raise ValueError(f"max_ratio {self.max_ratio} is below one step of {self.step}")
        return self

    @property
    def max_step(self) -> int:
        return int(self.max_ratio / self.step + 1e-9)

    def grid(self) -> list[float]:
        """The ratios a unit may get, step by step from 0."""
        return [round(index * self.step, 12) for index in range(self.max_step + 1)]

    def allocate(self, layers: list[LayerInfo], sparsity: float, scores: ScoreFn | None) -> dict[str, float]:
        if self.levels is None:
            raise PrunekitError(f"allocation {self.name} measures the model; run it through prunekit prune "
                                "(or prunekit.weights.search), or give its levels")
        missing = [layer.name for layer in layers if layer.name not in self.levels]
        if missing:
            raise PrunekitError(f"allocation {self.name}'s levels name no ratio for {missing[0]}"
                                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                                + "; search again or give every targeted layer")
        return {layer.name: self.levels[layer.name] for layer in layers}

    def search(self, problem: LevelProblem) -> SearchOutcome:
        raise NotImplementedError

    def fitness_tokens(self) -> list[int]:
        """Calibration tokens of each selection stage's measurement (the first also measures unit costs)."""
        return [self.sensitivity_tokens]

    def search_settings(self) -> dict[str, Any]:
        """The settings that decide the search's result (what keys a resumable state), without found levels; the
        sequential check runs after the search and changes nothing in it, so a search resumes whatever it says."""
        return {key: value for key, value in self.settings().items()
                if key not in ("levels", "database", "sequential_check")}


def uniform_steps(problem: LevelProblem) -> list[int] | None:
    """Every unit at the same step, when that meets the target exactly (None otherwise)."""
    total = sum(problem.unit_weights)
    if total == 0 or problem.target % total:
        return None
    step = problem.target // total
    return [step] * len(problem.unit_weights) if step <= problem.max_step else None


def budget_quanta(sizes: Sequence[int]) -> tuple[list[int], int, bool]:
    """Unit sizes in whole budget quanta: their greatest common divisor, so the budget is exact, unless the
    knapsack's table would grow too large; returns (weights, quantum, exact)."""
    quantum = math.gcd(*sizes) if sizes else 1
    exact = True
    if sum(sizes) // max(quantum, 1) > _MAX_QUANTA:
        quantum, exact = math.ceil(sum(sizes) / _MAX_QUANTA), False
    return [max(1, round(size / quantum)) for size in sizes], quantum, exact
