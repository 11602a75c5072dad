"""A measured allocation's search over one-shot weight pruning levels, start to finish.

``search_levels(model, settings, calibration)``: plan the pruning as ``prune_weights`` would, group the targets
into units, build (or reuse) the level database, measure, and let the allocation (``knapsack``,
``evolutionary``: ``core.allocation``) choose one level per unit. The model is left dense; the result's
``levels`` (ratio per layer) go into the allocation's settings, and ``prune_weights`` then prunes at them.

The search measures candidates stitched from the database's levels, while ``prune_weights`` prunes the chosen
levels sequentially, each layer from the inputs the pruned layers before it give: for a method that updates the
kept weights the two models differ even over the reference stream (``database``), whose other levels assume a
past pruned at the reference ratio. The *sequential check* (on by default with the reference stream) therefore
prunes the model the way ``prune_weights`` will, at the search's start (the evolution's first parent; for the
knapsack, which has none, the uniform ratio ``prune`` uses without a search) and at the found levels, measures
both on the last selection stage's tokens, and returns the better: the answer is never worse than its start on
the model that will really be produced. It costs two sequential prunings and two measurements (on SmolLM2 with
SparseGPT about two minutes, against four to six for the search); with a method that only zeroes weights, over
the dense stream, it is off by default.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from prunekit.core.allocation.fitness import KLMeter, fitness_windows
from prunekit.core.allocation.search import (MEASUREMENT, MeasuredAllocation, SearchOutcome, budget_quanta,
                                              uniform_steps)
from prunekit.core.progress import progress_bar
from prunekit.errors import PrunekitError
from prunekit.evaluate.resources import Measured
from prunekit.io.atomic import write_text
from prunekit.weights.pipeline import BlockSource, PrunePlan, check_finite, plan_pruning, prune_blocks
from prunekit.weights.recipe import PruneSettings
from prunekit.weights.search.database import LevelDatabase, Unit, choose_stream, group_units, tensor_digest



def needs_search(settings: PruneSettings) -> bool:
    """Whether the settings' allocation measures the model and has not been given its levels yet."""
    from prunekit.core.allocation import get_allocation

    allocation = get_allocation(settings.allocation)
    return MEASUREMENT in allocation.needs and getattr(allocation, "levels", None) is None


@dataclass
class SearchResult:
    """What a search found and what it cost; ``levels`` is the ratio of every targeted layer."""

    allocation: dict
    levels: dict[str, float]
    units: list[dict]
    ratio: float
    achieved_ratio: float
    budget_exact: bool
    predicted_cost: float | None
    fitness: float | None
    start_fitness: float | None
    curve: list[dict]
    evaluations: int
    fitness_tokens: list[int]  # the token counts measured on: unit costs and selection stages
    database: dict
    # the found and the start levels pruned sequentially and measured, and which was kept (None: not run)
    sequential_check: dict | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    peak_rss_bytes: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


class WeightLevelProblem:
    """``core.allocation.search.LevelProblem`` for weight pruning: the model set to candidate levels from the
    database, measured with ``KLMeter`` (one per selection stage; the first also measures unit costs).

    The unit costs are centred on the model the database's levels belong to. Over the dense stream that is the
    dense model: a unit's cost is the KL with it alone compressed. Over the reference stream (with ``kl``
    costs and a ratio on the grid) it is the reference model, every unit at the ratio: a unit's cost is the KL
    with it alone moved to another level minus the reference's KL (zero at the ratio, negative below it). A
    level fitted on a reference-pruned past, measured inside an otherwise dense model, would be judged on
    inputs it was not made for (on SmolLM2 with SparseGPT at 70 % such dense-centred costs led the knapsack
    to levels worse than uniform once pruned sequentially)."""

    def __init__(self, plan: PrunePlan, allocation: MeasuredAllocation, units: list[Unit], database: LevelDatabase,
                 calibration: torch.Tensor, state_path: Path | None):
        self.plan, self.allocation, self.units, self.database = plan, allocation, units, database
        self.unit_names = [u.name for u in units]
        self.unit_weights, self.quantum, self.exact = budget_quanta([u.parameters for u in units])
        self.max_step = allocation.max_step
        wanted = plan.ratio / allocation.step * sum(self.unit_weights)
        self.target = round(wanted)
        if abs(wanted - self.target) > 1e-6:
            self.exact = False
        self.calibration, self.state_path = calibration, state_path
        self.current = [0] * len(units)
        self.tokens = allocation.fitness_tokens()
        self.meters: dict[int, KLMeter] = {}
        self.meter_bases: dict[int, list[int]] = {}  # per meter: the steps its kept block inputs belong to
        self.cost_base = self._cost_base()
        self.base_kl: float | None = None
        self.cost_table: list[list[float]] | None = None
        self.cost_seconds = 0.0

    def _cost_base(self) -> list[int]:
        """The steps the unit costs are centred on (class docstring)."""
        stream = self.database.stream
        if stream.kind == "reference" and self.allocation.sensitivity == "kl":
            grid = self.database.grid
            level = min(range(len(grid)), key=lambda step: abs(grid[step] - stream.reference_ratio))
            if abs(grid[level] - stream.reference_ratio) < 1e-9:
                return [level] * len(self.units)
        return [0] * len(self.units)

    def meter(self, tokens: int, keep_block_inputs: bool = False, base: list[int] | None = None) -> KLMeter:
        """The meter on the first calibration windows holding ``tokens`` tokens (one per token count); ``base``:
        the steps its kept block inputs must belong to (the dense model's when it is made)."""
        found = self.meters.get(tokens)
        if found is None or (keep_block_inputs and found.block_inputs is None):
            self.meters.pop(tokens, None)  # one meter per token count: its dense log-probabilities are large
            self.set_steps([0] * len(self.units))
            windows = fitness_windows(self.calibration, tokens)
            found = self.meters[tokens] = KLMeter(self.plan.adapter.model, self.plan.adapter, windows,
                                                  keep_block_inputs)
            self.meter_bases[tokens] = [0] * len(self.units)
        if base is not None and found.block_inputs is not None and self.meter_bases[tokens] != list(base):
            self.set_steps(base)
            found.rebase()
            self.meter_bases[tokens] = list(base)
        return found

    def stages(self) -> int:
        return len(self.tokens)

    def baseline(self) -> list[int]:
        """prune's allocation without a search is uniform: every unit at the ratio's level."""
        steps = uniform_steps(self)
        if steps is None:
            raise PrunekitError("the ratio is not a level of the search's grid, so no uniform start meets it exactly; "
                                "start from the knapsack")
        return steps

    def set_steps(self, steps: Sequence[int]) -> None:
        for unit, step in enumerate(steps):
            if self.current[unit] != step:
                self.database.apply(unit, step)
                self.current[unit] = step

    def costs(self) -> list[list[float]]:
        """Measured once per database, kind of cost and token count, and kept beside the database unit by unit
        (the knapsack of every budget and the evolution's start read the same table; a stopped sweep resumes)."""
        if self.cost_table is not None:
            return self.cost_table
        started = time.perf_counter()
        path = (self.database.directory
                / f"costs-{self.allocation.sensitivity}-{self.allocation.sensitivity_tokens}.json")
        if any(self.cost_base):
            path = path.with_name(f"{path.stem}-around-level-{self.cost_base[0]}.json")
        saved = json.loads(path.read_text()) if path.exists() else {}
        table = []
        with progress_bar(f"Unit costs ({self.allocation.sensitivity})", len(self.units) * self.max_step) as bar:
            for unit in range(len(self.units)):
                row = saved.get(self.units[unit].name)
                if row is None or len(row) != self.max_step + 1:
                    row = [self._cost(unit, step) for step in range(self.max_step + 1)]
                    saved[self.units[unit].name] = row
                    write_text(path, json.dumps(saved))
                table.append(row)
                bar.advance(self.max_step)
        self.set_steps([0] * len(self.units))
        self.cost_table = table
        self.cost_seconds = time.perf_counter() - started
        return table

    def _cost(self, unit: int, step: int) -> float:
        """The measured cost of moving ``unit`` alone from the cost base to ``step``."""
        base = self.cost_base
        if step == base[unit]:
            return 0.0
        # made first: making or rebasing a meter sets the model's steps
        meter, block = self.meter(self.allocation.sensitivity_tokens, True, base), self.units[unit].block
        if self.allocation.sensitivity != "kl":
            self.set_steps([step if u == unit else 0 for u in range(len(self.units))])
            return meter.block_error(block)
        if self.base_kl is None:
            self.set_steps(base)
            self.base_kl = meter.kl() if any(base) else 0.0
        self.set_steps([step if u == unit else base[u] for u in range(len(self.units))])
        return meter.kl(block) - self.base_kl

    def fitness(self, stage: int, steps: Sequence[int]) -> float:
        tokens = self.tokens[stage]
        meter = self.meter(tokens)
        self.set_steps(steps)
        base = self.meter_bases[tokens]
        moved = [self.units[u].block for u, step in enumerate(steps) if step != base[u]]
        first = min(moved, default=len(self.plan.adapter.blocks()))
        return meter.kl(first if meter.block_inputs is not None else 0)

    def sequential_fitness(self, steps: Sequence[int], tokens: int) -> float:
        """KL on the meter of ``tokens`` of the model pruned at ``steps`` as ``prune_weights`` prunes it (block by
        block, each layer from the inputs the pruned layers before it give); the model is dense again after."""
        meter = self.meter(tokens)  # made first: making a meter sets the model dense
        self.set_steps([0] * len(self.units))
        ratios = {t.name: self.database.grid[step] for unit, step in zip(self.units, steps) for t in unit.targets}
        try:
            prune_blocks(self.plan, BlockSource(self.plan.adapter.model), ratios, self.calibration)
            return meter.kl()
        finally:
            for unit in range(len(self.units)):
                self.database.apply(unit, 0)

    def sequential_check(self, found: list[int], start: list[int], start_kind: str) -> tuple[list[int], dict]:
        """The better of ``found`` and ``start`` pruned sequentially, on the last stage's tokens (a tie keeps
        ``found``), and both measurements."""
        tokens = self.tokens[-1]
        found_kl = self.sequential_fitness(found, tokens)
        start_kl = found_kl if list(start) == list(found) else self.sequential_fitness(start, tokens)
        kept = "start" if start_kl < found_kl else "found"
        return (list(start) if kept == "start" else list(found),
                {"tokens": tokens, "start": start_kind, "start_kl": start_kl, "found_kl": found_kl, "kept": kept})

    def load_state(self) -> dict | None:
        if self.state_path is None or not self.state_path.exists():
            return None
        try:
            return json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return None

    def save_state(self, state: dict) -> None:
        if self.state_path is not None:
            self.state_path.parent.mkdir(parents=True, exist_ok=True)
            write_text(self.state_path, json.dumps(state))


def _model_digest(model: nn.Module) -> str:
    """The digest of every parameter and buffer: the model as it is in memory, whatever file it came from."""
    return tensor_digest([tensor for _, tensor in sorted(model.state_dict().items())])


def search_levels(model: nn.Module, settings: PruneSettings, calibration: torch.Tensor, *,
                  model_digest: str | None = None) -> SearchResult:
    """Run the settings' measured allocation on ``model`` (left dense) and return the levels it chose."""
    if calibration is None:
        raise PrunekitError("a measured allocation needs calibration data")
    plan = plan_pruning(model, settings, True)
    allocation = plan.allocation
    if MEASUREMENT not in allocation.needs or not isinstance(allocation, MeasuredAllocation):
        raise PrunekitError(f"allocation {allocation.name} does not search")
    if plan.pattern.is_nm:
        raise PrunekitError("an N:M pattern fixes every layer's ratio; a measured allocation has nothing to choose")
    if plan.untie or plan.correction is not None:
        raise PrunekitError("a measured allocation searches the blocks' layers without a low-rank correction")
    if settings.overrides:
        raise PrunekitError("a measured allocation chooses every layer's ratio; leave out the per-layer overrides")
    if settings.asymmetric:
        raise PrunekitError("a measured allocation's level database is pruned without the dense twin stream, so "
                            "its candidates would not be the model --asymmetric prunes; leave out one of them")
    check_finite(plan.targets)
    started = time.perf_counter()
    with Measured() as measured:
        units = group_units(plan.adapter, plan.targets, allocation.unit)
        grid = allocation.grid()
        digest = model_digest or _model_digest(model)
        stream = choose_stream(allocation.database_stream, plan)
        key = LevelDatabase.key(digest, plan, units, grid, calibration, settings.batch_size, stream)
        database = LevelDatabase.at(allocation.database, key, units, grid, stream)
        reused = database.complete()
        database.build(plan, calibration, settings.batch_size)
        built = time.perf_counter()
        # more generations continue a saved search (core.allocation.evolutionary), so they share its state file
        described = {k: v for k, v in allocation.search_settings().items() if k != "generations"}
        search_key = hashlib.sha256(json.dumps({"allocation": described, "ratio": plan.ratio},
                                               sort_keys=True).encode()).hexdigest()[:16]
        problem = WeightLevelProblem(plan, allocation, units, database, calibration,
                                     database.directory / "searches" / f"{search_key}.json")
        check = None
        try:
            outcome: SearchOutcome = allocation.search(problem)
            searched = time.perf_counter()
            chosen = outcome.steps
            checked = (allocation.sequential_check if allocation.sequential_check is not None
                       else stream.kind == "reference")
            if outcome.start_steps:
                start, start_kind = outcome.start_steps, getattr(allocation, "start", "start")
            else:
                start, start_kind = uniform_steps(problem), "uniform"
            if checked and start is not None:
                chosen, check = problem.sequential_check(outcome.steps, start, start_kind)
        finally:
            problem.set_steps([0] * len(units))  # the model leaves dense, as it came
        checked_at = time.perf_counter()
    levels = {t.name: grid[step] for unit, step in zip(units, chosen) for t in unit.targets}
    total = sum(u.parameters for u in units)
    achieved = sum(u.parameters * grid[s] for u, s in zip(units, chosen)) / max(total, 1)
    costs = problem.cost_table
    start = outcome.start_steps or (start if check else None)  # the knapsack's uniform start only once compared
    unit_rows = [{"name": u.name, "block": u.block, "parameters": u.parameters, "ratio": grid[s],
                  "found_ratio": grid[outcome.steps[i]], "start_ratio": grid[start[i]] if start else None,
                  "cost": costs[i][s] if costs else None}
                 for i, (u, s) in enumerate(zip(units, chosen))]
    return SearchResult(
        allocation=allocation.search_settings(), levels=levels, units=unit_rows, ratio=plan.ratio,
        achieved_ratio=achieved, budget_exact=problem.exact, predicted_cost=outcome.predicted_cost,
        fitness=outcome.fitness, start_fitness=outcome.start_fitness, curve=outcome.curve,
        evaluations=outcome.evaluations,
        fitness_tokens=sorted(meter.tokens for meter in problem.meters.values()),
        database={"path": str(database.directory), "reused": reused, "blocks_built": database.built_blocks,
                  "bytes": database.size_bytes(), "levels": grid, "units": len(units), **stream.describe()},
        sequential_check=check,
        seconds={"database": built - started, "unit_costs": problem.cost_seconds, "search": searched - built,
                 "sequential_check": checked_at - searched, "total": checked_at - started},
        peak_rss_bytes=measured.peak_rss)


def with_levels(settings: PruneSettings, levels: dict[str, float]) -> dict[str, Any]:
    """The allocation's settings carrying the found levels (what a recipe stores to skip the search)."""
    return {**settings.allocation, "levels": levels}
