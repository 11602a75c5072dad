"""The width of every family chosen by measurement and search (issue 18): ``knapsack`` and ``evolutionary``
allocations for ``prunekit shrink``.

A *unit* of the search is one family ``prunekit shrink`` plans over (a block's MLP neurons, its key/value
groups); its *level* ``s`` removes ``s · per_step`` of the family's lowest-scored units (the same criterion
scores the ``global`` allocation ranks), where ``per_step`` is the allocation's ``step`` of the family's size
rounded to the family's rounding unit (``round_to`` neurons; whole KV groups). A family's levels stop at its
floor (or ``max_ratio``): a level beyond costs ``inf``, so neither the knapsack nor the evolution keeps it.

``evolutionary`` starts by default from shrink's own ``global`` allocation (``start: baseline``): its grid is
then the families' rounding unit (``round_to`` neurons, one KV group), on which the global widths lie, so the
evolution begins exactly at the default's solution and, keeping the best, never ends worse by its fitness;
``start: knapsack`` searches the coarser ``step`` grid from the knapsack's solution instead.

The budget is exact: removing ``per_step`` units of a family removes the same number of parameters (or MACs)
at every level and whatever the other families keep (checked on the graph's cost model, which refuses
families that share a layer, as hidden width does), so the weights in parameters are exact and every
solution removes ``target`` quanta, the least number of them reaching the ratio.

Candidates are measured without rebuilding the model: the units a level removes are zeroed in place (a
neuron whose gate, up and down slices are zero, or a KV group whose query, key, value and output slices are
zero, contributes exactly nothing: zeroing is output-equivalent to removing) and put back from a saved copy
when the level drops, so the model leaves the search bit for bit as it came. A unit's cost is
KL(dense ‖ candidate) of the final logits with only that unit compressed (``core.allocation.fitness.KLMeter``,
rerunning only the blocks from the unit's onwards); the fitness of a whole candidate is the same KL with
every unit at its level. With the allocation's ``database`` directory, the unit costs (unit by unit) and the
evolution's state (generation by generation) are kept there, so an interrupted search resumes.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from prunekit.core.allocation.fitness import KLMeter, fitness_windows
from prunekit.core.allocation.search import MeasuredAllocation, SearchOutcome, budget_quanta
from prunekit.core.progress import progress_bar
from prunekit.errors import PrunekitError
from prunekit.io.atomic import write_text
from prunekit.io.digest import tensor_digest
from prunekit.models.base import ModelAdapter
from prunekit.structure.allocation import (Normalization, Target, WidthAllocation, WidthPlan, _Bounds, _left_whole,
                                           allocate, plan_from_widths, unit_ranks)
from prunekit.structure.graph import DependencyGraph, Family
from prunekit.structure.shrink import zero_units


@dataclass
class WidthGrid:
    """The search's units and their exact budget weights, computed from shapes alone."""

    families: list[Family]
    per_step: list[int]  # units of the family one level removes
    max_steps: list[int]  # the family's last level (its floor, or the allocation's max_ratio)
    weights: list[int]  # parameters (or MACs) one level removes, in quanta
    quantum: int
    exact: bool  # the quanta are exact (else unit sizes were rounded to keep the knapsack's table small)
    target: int  # quanta every solution removes
    total: int  # the model's parameters (or MACs) before
    skipped: list[str] = field(default_factory=list)  # families too small for one level: kept whole


def starts_at_baseline(allocation: MeasuredAllocation) -> bool:
    """An evolution started from the global allocation searches on the families' rounding grid."""
    return getattr(allocation, "start", None) == "baseline"


def width_grid(graph: DependencyGraph, families: list[Family], ratio: float, target: Target,
               strategy: WidthAllocation, allocation: MeasuredAllocation) -> WidthGrid:
    """The units, levels and exact weights of a width search; refuses a ratio the grid cannot reach."""
    measure = graph.parameter_count if target == "params" else graph.mac_count
    total = measure()
    fine = starts_at_baseline(allocation)
    units, per_step, max_steps, sizes, skipped = [], [], [], [], []
    for family in families:
        bounds = _Bounds(family, strategy.floor, strategy.round_to)
        if fine:  # the rounding grid, on which the global allocation's widths lie
            per = bounds.step
            last = min(int(allocation.max_ratio * family.size / per + 1e-9), (family.size - bounds.min_keep) // per)
        else:
            per = max(bounds.step, round(allocation.step * family.size / bounds.step) * bounds.step)
            last = min(allocation.max_step, (family.size - bounds.min_keep) // per)
        cost = total - measure({family.name: per})
        if last < 1 or cost <= 0:
            skipped.append(family.name)
            continue
        if total - measure({family.name: last * per}) != last * cost:
            raise PrunekitError(f"{family.name}: removing its {family.unit}s does not remove the same {target} at "
                                f"every width, which a width search's exact budget needs; leave out the hidden "
                                "granularity (it couples every layer)")
        units.append(family)
        per_step.append(per)
        max_steps.append(last)
        sizes.append(cost)
    if not units:
        raise PrunekitError("no family is large enough for one level of the search's grid; lower its step")
    if total - measure({f.name: p for f, p in zip(units, per_step)}) != sum(sizes):
        raise PrunekitError(f"the families share layers (hidden width couples every layer), so their {target} do "
                            "not add up as a width search's exact budget needs; leave out the hidden granularity")
    weights, quantum, exact = budget_quanta(sizes)
    wanted = ratio * total / quantum
    goal = max(0, math.ceil(wanted - 1e-9))
    reachable = sum(w * s for w, s in zip(weights, max_steps))
    if goal > reachable:
        raise PrunekitError(f"a ratio of {ratio:.0%} of the {target} cannot be reached by the search's grid: with "
                            f"every family at its last level at most {reachable * quantum / total:.1%} can be "
                            "removed; lower the ratio or the floor, or raise the search's max_ratio"
                            + _left_whole(graph))
    return WidthGrid(units, per_step, max_steps, weights, quantum, exact, goal, total, skipped)


def _block_of(family: Family, adapter: ModelAdapter) -> int:
    """The first block a family's tensors live in (0 when outside the blocks: the run then starts at the top)."""
    pattern = re.compile(rf"^{re.escape(adapter.blocks_path)}\.(\d+)\.")
    found = [int(m.group(1)) for member in family.members if (m := pattern.match(member.tensor))]
    return min(found, default=0)


class WidthLevelProblem:
    """``core.allocation.search.LevelProblem`` over families' widths, measured by zeroing (module docstring)."""

    def __init__(self, graph: DependencyGraph, adapter: ModelAdapter, grid: WidthGrid,
                 scores: Mapping[str, torch.Tensor], allocation: MeasuredAllocation, windows: torch.Tensor,
                 baseline: Callable[[], Mapping[str, int]] | None = None):
        self.graph, self.adapter, self.grid, self.allocation, self.windows = graph, adapter, grid, allocation, windows
        self._baseline = baseline
        self.unit_names = [f.name for f in grid.families]
        self.unit_weights = list(grid.weights)
        self.max_step = max(grid.max_steps) if starts_at_baseline(allocation) else allocation.max_step
        self.target = grid.target
        self.blocks = [_block_of(f, adapter) for f in grid.families]
        # A level's units are the family's lowest-scored; the lowest k are nested as k grows (a stable sort),
        # so moving a level only zeroes or restores the units between the two levels: those whose rank (within
        # their group) lies between the two levels' counts.
        self.ranks = [unit_ranks(f, scores[f.name]) for f in grid.families]
        self.saved: list[tuple[dict[int, int], list[torch.Tensor]]] = []
        with torch.no_grad():
            for unit, family in enumerate(grid.families):
                ordered = self._between(unit, 0, grid.max_steps[unit])
                index = torch.as_tensor(ordered, dtype=torch.long)
                copies = [graph.tensor(m.tensor).index_select(m.dim, m.index[index].reshape(-1)).clone()
                          for m in family.members]
                self.saved.append(({unit: i for i, unit in enumerate(ordered)}, copies))
        self.current = [0] * len(grid.families)
        self.tokens = allocation.fitness_tokens()
        self.meters: dict[int, KLMeter] = {}
        self.cost_table: list[list[float]] | None = None
        self.cost_seconds = 0.0
        self._state: dict | None = None  # without a database directory the state lives as long as the problem
        # What the unit costs depend on (not the budget: every ratio's search reads the same costs); the
        # evolution's own state file adds the target, and the evolution checks its settings itself.
        key = {"model": tensor_digest([t for _, t in sorted(graph.model.state_dict().items())]),
               "windows": tensor_digest([windows]), "units": self.unit_names, "per_step": grid.per_step,
               "max_steps": grid.max_steps, "scores": tensor_digest([scores[f.name].double() for f in grid.families])}
        self.key = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    # -- the model at candidate levels ------------------------------------------------------------------------

    def removed(self, unit: int, step: int) -> list[int]:
        """The units of family ``unit`` that level ``step`` removes, in index order."""
        return self._between(unit, 0, step)

    def _between(self, unit: int, low: int, high: int) -> list[int]:
        """The units level ``high`` removes and level ``low`` keeps (``low`` ≤ ``high``), in index order."""
        family, per = self.grid.families[unit], self.grid.per_step[unit]
        each = per // family.groups
        rank = self.ranks[unit]
        return torch.nonzero((rank >= low * each) & (rank < high * each)).flatten().tolist()

    def _restore(self, unit: int, units: set[int]) -> None:
        family = self.grid.families[unit]
        position, copies = self.saved[unit]
        ordered = sorted(units)
        index = torch.as_tensor(ordered, dtype=torch.long)
        with torch.no_grad():
            for member, copy in zip(family.members, copies):
                local = torch.as_tensor([position[u] * member.per_unit + k for u in ordered
                                         for k in range(member.per_unit)], dtype=torch.long)
                self.graph.tensor(member.tensor).index_copy_(member.dim, member.index[index].reshape(-1),
                                                             copy.index_select(member.dim, local))

    def set_steps(self, steps: Sequence[int]) -> None:
        for unit, step in enumerate(steps):
            current = self.current[unit]
            if step == current:
                continue
            if not 0 <= step <= self.grid.max_steps[unit]:
                raise ValueError(f"{self.unit_names[unit]} has no level {step}")
            if step > current:
                zero_units(self.graph, self.grid.families[unit], self._between(unit, current, step))
            else:
                self._restore(unit, set(self._between(unit, step, current)))
            self.current[unit] = step

    def baseline(self) -> list[int]:
        """The steps of shrink's ``global`` allocation (the same scores, floor and rounding) on this grid, whose
        levels are the families' rounding unit when the evolution starts there (``width_grid``)."""
        if self._baseline is None:
            raise PrunekitError("this width search has no baseline allocation to start from")
        widths = self._baseline()
        steps = []
        for family, per, last in zip(self.grid.families, self.grid.per_step, self.grid.max_steps):
            removed = family.size - widths.get(family.name, family.size)
            if removed % per or removed // per > last:
                raise PrunekitError(f"the global allocation keeps {family.size - removed} of {family.name}'s "
                                    f"{family.size} {family.unit}s, beyond the search's grid ({per} {family.unit}s "
                                    f"a level, at most {last} levels): raise the search's max_ratio")
            steps.append(removed // per)
        skipped = [name for name in self.grid.skipped if widths.get(name) not in (None, self._size(name))]
        if skipped:
            raise PrunekitError(f"the global allocation narrows {skipped[0]}, which the search's grid leaves whole")
        return steps

    def _size(self, name: str) -> int:
        return next(f.size for f in self.graph.families if f.name == name)

    def feasible(self, steps: Sequence[int]) -> bool:
        return all(0 <= s <= last for s, last in zip(steps, self.grid.max_steps))

    def meter(self, tokens: int, keep_block_inputs: bool = False) -> KLMeter:
        """The meter on the first calibration windows holding ``tokens`` tokens (one per token count)."""
        found = self.meters.get(tokens)
        if found is None or (keep_block_inputs and found.block_inputs is None):
            self.meters.pop(tokens, None)  # its dense log-probabilities are large: one meter per token count
            self.set_steps([0] * len(self.current))  # a meter records the dense model
            found = self.meters[tokens] = KLMeter(self.graph.model, self.adapter,
                                                  fitness_windows(self.windows, tokens), keep_block_inputs)
        return found

    # -- LevelProblem ------------------------------------------------------------------------------------------

    def stages(self) -> int:
        return len(self.tokens)

    def costs(self) -> list[list[float]]:
        if self.cost_table is not None:
            return self.cost_table
        started = time.perf_counter()
        path = self._path(f"width-costs-{self.key}-{self.allocation.sensitivity_tokens}.json")
        saved = json.loads(path.read_text()) if path is not None and path.exists() else {}
        table = []
        work = sum(self.grid.max_steps)
        with progress_bar("Width costs (KL, one family at a time)", work) as bar:
            for unit, name in enumerate(self.unit_names):
                row = saved.get(name)
                if row is None:
                    row = [0.0] + [self._cost(unit, step) for step in range(1, self.grid.max_steps[unit] + 1)]
                    saved[name] = row
                    if path is not None:
                        write_text(path, json.dumps(saved))
                table.append(list(row) + [math.inf] * (self.max_step + 1 - len(row)))
                bar.advance(self.grid.max_steps[unit])
        self.set_steps([0] * len(self.current))
        self.cost_table = table
        self.cost_seconds = time.perf_counter() - started
        return table

    def _cost(self, unit: int, step: int) -> float:
        meter = self.meter(self.allocation.sensitivity_tokens, True)  # made first: making a meter sets it dense
        steps = [0] * len(self.current)
        steps[unit] = step
        self.set_steps(steps)
        return meter.kl(self.blocks[unit])

    def fitness(self, stage: int, steps: Sequence[int]) -> float:
        if not self.feasible(steps):
            return math.inf  # a level past a family's floor: never chosen, and nothing to run
        meter = self.meter(self.tokens[stage])
        self.set_steps(steps)
        changed = [block for block, step in zip(self.blocks, steps) if step > 0]
        first = min(changed, default=len(self.adapter.blocks()))
        return meter.kl(first if meter.block_inputs is not None else 0)

    def _path(self, name: str) -> Path | None:
        if not self.allocation.database:
            return None
        directory = Path(self.allocation.database)
        directory.mkdir(parents=True, exist_ok=True)
        return directory / name

    def load_state(self) -> dict | None:
        path = self._path(f"width-search-{self.key}-{self.target}.json")
        if path is None:
            return self._state
        try:
            return json.loads(path.read_text()) if path.exists() else None
        except (OSError, ValueError):
            return None

    def save_state(self, state: dict) -> None:
        path = self._path(f"width-search-{self.key}-{self.target}.json")
        if path is None:
            self._state = state
            return
        write_text(path, json.dumps(state))


@dataclass
class WidthSearch:
    """What a width search found and what it cost (the ``search`` section of a shrink report)."""

    allocation: dict
    widths: dict[str, int]  # family -> kept units (what the recipe stores)
    units: list[dict]
    target_quanta: int
    quantum: int
    budget_exact: bool
    predicted_cost: float | None
    fitness: float | None  # KL of the solution on the last stage's tokens (measured for the knapsack too)
    start_fitness: float | None
    fitness_tokens: list[int]
    curve: list[dict]
    evaluations: int
    seconds: dict[str, float]
    skipped: list[str]

    def to_dict(self) -> dict:
        return asdict(self)


def search_widths(graph: DependencyGraph, adapter: ModelAdapter | None, families: list[Family],
                  scores: Mapping[str, torch.Tensor], ratio: float, target: Target, strategy: WidthAllocation,
                  windows: torch.Tensor | None, default_normalize: Normalization = "mean") -> tuple[WidthPlan, WidthSearch]:
    """Search the width of every family (``strategy``: knapsack or evolutionary) on the calibration token
    ``windows``; the model (``graph.model``) is left as it came. Returns the plan and what the search did.
    ``default_normalize`` is the criterion's normalisation for the ``global`` allocation an evolution may start
    from (``start: baseline``)."""
    allocation = strategy.measured()
    if adapter is None or windows is None:
        raise PrunekitError(f"allocation {strategy.name} measures the KL of a language model's logits; it needs a "
                            "causal language model and calibration token windows")
    model: nn.Module = graph.model
    grid = width_grid(graph, families, ratio, target, strategy, allocation)
    started = time.perf_counter()
    was_training = model.training
    model.eval()
    def baseline() -> dict[str, int]:
        heuristic = WidthAllocation(name="global", floor=strategy.floor, round_to=strategy.round_to,
                                    normalize=strategy.normalize)
        plan = allocate(graph, families, scores, ratio, target, heuristic, default_normalize=default_normalize)
        return {name: kept for name, (_, kept) in plan.widths.items()}

    problem = WidthLevelProblem(graph, adapter, grid, scores, allocation, windows, baseline)
    try:
        outcome: SearchOutcome = allocation.search(problem)
        fitness = outcome.fitness
        evaluations = outcome.evaluations
        if fitness is None:  # the knapsack's own measure is its summed costs: measure the solution too
            fitness = problem.fitness(problem.stages() - 1, outcome.steps)
            evaluations += 1
    finally:
        problem.set_steps([0] * len(grid.families))  # the model leaves as it came, bit for bit
        model.train(was_training)
    finished = time.perf_counter()
    widths = {f.name: f.size - step * per for f, step, per in zip(grid.families, outcome.steps, grid.per_step)}
    plan = plan_from_widths(graph, families, scores, ratio, target, widths)
    removed = grid.total - plan.total_after
    if grid.exact and removed != sum(w * s for w, s in zip(grid.weights, outcome.steps)) * grid.quantum:
        raise AssertionError("the width search's budget and the graph's cost model disagree")
    costs = problem.cost_table
    units = [{"name": f.name, "units": f.size, "kept": widths[f.name], "per_step": per, "step": step,
              "start_kept": f.size - outcome.start_steps[i] * per if outcome.start_steps else None,
              "cost": costs[i][step] if costs else None}
             for i, (f, step, per) in enumerate(zip(grid.families, outcome.steps, grid.per_step))]
    search = WidthSearch(
        allocation=allocation.search_settings(), widths=widths, units=units, target_quanta=grid.target,
        quantum=grid.quantum, budget_exact=grid.exact, predicted_cost=outcome.predicted_cost, fitness=fitness,
        start_fitness=outcome.start_fitness, fitness_tokens=sorted(m.tokens for m in problem.meters.values()),
        curve=outcome.curve, evaluations=evaluations,
        seconds={"unit_costs": problem.cost_seconds, "search": finished - started}, skipped=grid.skipped)
    plan.notes.append(f"widths chosen by the {strategy.name} search: KL to the unpruned model "
                      + (f"{outcome.start_fitness:.5f} at the start, " if outcome.start_fitness is not None else "")
                      + f"{fitness:.5f} found, {evaluations} candidates measured, {finished - started:.0f} s")
    return plan, search


__all__ = ["WidthGrid", "WidthLevelProblem", "WidthSearch", "search_widths", "width_grid"]
