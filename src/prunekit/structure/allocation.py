"""How many units each family keeps, for one target: a fraction of the model's parameters (or MACs).

Two strategies, one knob each:

- ``uniform``: every family loses the same fraction of its units;
- ``global``: one threshold on normalised scores across all families (the least important units
  of the whole model go first), never below a per-family floor.

And two measured ones (issue 18), ``knapsack`` and ``evolutionary``: every family's width is chosen
by searching over a grid of widths with the model measured against the unpruned one
(``prunekit.structure.search``). The search runs in ``prune_structure``; once found, the kept width
of every family is stored in ``widths`` and ``allocate`` simply follows it, so a written recipe
reproduces the model without searching.

Kept widths are rounded to a multiple (``round_to``, for neurons and channels; heads are whole
units already, and grouped-query heads stay a multiple of the number of groups). Per-family
overrides fix a family's removed fraction; the rest is solved so the whole model reaches the
target. Costs come from the graph's exact cost model, so interactions (a Linear losing rows to
one family and columns to another) are counted exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from prunekit.core.allocation import get_allocation
from prunekit.core.allocation.search import MeasuredAllocation
from prunekit.errors import PrunekitError
from prunekit.structure.graph import DependencyGraph, Family
from prunekit.structure.importance.base import Normalization, normalize_scores

Target = Literal["params", "macs"]
SEARCHED = ("knapsack", "evolutionary")  # the allocations that measure the model (core.allocation's of that name)
# How much more than the ratio searched widths may remove (a tiny model's budget quanta are coarse).
_WIDTHS_SLACK = 0.05


class WidthAllocation(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Literal["uniform", "global", "knapsack", "evolutionary"] = "global"
    floor: float = Field(0.1, ge=0.0, le=1.0, description="smallest fraction of a family's units that is kept")
    round_to: int = Field(8, ge=1, description="kept neurons/channels are a multiple of this (families of at least 2×)")
    normalize: Normalization | None = Field(None, description="cross-family normalisation for global ranking; "
                                                              "default: the criterion's own (kind for flap, cost for fisher, else mean)")
    search: dict[str, Any] = Field(default_factory=dict, description="knapsack/evolutionary: the search's settings "
                                   "(step, max_ratio, sensitivity_tokens, generations, offspring, stage_tokens, "
                                   "survivors, seed, database; core.allocation)")
    widths: dict[str, int] | None = Field(None, description="family -> kept units found by an earlier search; "
                                                            "given, no search runs")

    @model_validator(mode="after")
    def _measured(self) -> "WidthAllocation":
        if self.name not in SEARCHED:
            if self.search or self.widths is not None:
                raise PrunekitError(f"allocation {self.name} does not search: search settings and widths belong to "
                                    "knapsack or evolutionary")
            return self
        self.measured()  # an unknown setting is refused here, before any loading
        return self

    @property
    def searched(self) -> bool:
        return self.name in SEARCHED

    def measured(self) -> MeasuredAllocation:
        """The core allocation that searches the widths (``core.allocation``'s knapsack or evolutionary)."""
        if "levels" in self.search or "unit" in self.search:
            raise PrunekitError("a width search's units are the families and its result their widths: leave out "
                                "levels and unit")
        search = dict(self.search)
        if self.name == "evolutionary":
            search.setdefault("start", "baseline")  # the global allocation: never worse than the default
            if search["start"] == "baseline" and "step" in search:
                raise PrunekitError("an evolution started from the global allocation searches on the families' "
                                    "rounding grid; leave out step (or start from the knapsack)")
        return get_allocation({"name": self.name, **search})


def check_search_combination(allocation: WidthAllocation, reconstruct: bool, overrides: Mapping[str, float] | None,
                             compensation: bool = False) -> None:
    """Refuse what a width search cannot measure: it zeroes units, so a refit or FLAP's bias compensation after
    removal is not what it measured; and it chooses every family's width, so it takes no override."""
    if not allocation.searched or allocation.widths is not None:
        return
    if reconstruct:
        raise PrunekitError(f"allocation {allocation.name} measures the widths without a refit; leave out "
                            "--reconstruct, or search first and reconstruct with the recipe it writes")
    if overrides:
        raise PrunekitError(f"allocation {allocation.name} chooses every family's width; leave out the overrides")
    if compensation:
        raise PrunekitError(f"allocation {allocation.name} measures the widths without bias compensation; use "
                            "an importance without it (fisher, taylor, wanda, l2)")


@dataclass
class WidthPlan:
    removal: dict[str, list[int]]
    widths: dict[str, tuple[int, int]]  # family -> (units, kept)
    target: str
    ratio: float
    total_before: int
    total_after: int
    notes: list[str] = field(default_factory=list)

    @property
    def achieved(self) -> float:
        return 1 - self.total_after / self.total_before if self.total_before else 0.0

    def to_dict(self) -> dict:
        return {"target": self.target, "ratio": self.ratio, "achieved": self.achieved,
                "total_before": self.total_before, "total_after": self.total_after,
                "widths": {k: list(v) for k, v in self.widths.items()}, "notes": self.notes}


def check_ratio(ratio: float, what: str = "ratio") -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio):
        raise PrunekitError(f"the {what} must be a number in [0, 1), got {ratio!r}")
    if not 0.0 <= ratio < 1.0:
        raise PrunekitError(f"the {what} must be in [0, 1) (the fraction removed), got {ratio}")
    return float(ratio)


def _step(family: Family, round_to: int) -> int:
    step = family.groups
    if family.kind != "heads" and family.size >= 2 * round_to:
        step = math.lcm(step, round_to)
    return step


class _Bounds:
    def __init__(self, family: Family, floor: float, round_to: int):
        self.family = family
        self.step = _step(family, round_to)
        minimum = max(math.ceil(floor * family.size - 1e-9), 1)
        minimum = math.ceil(minimum / self.step) * self.step
        self.min_keep = min(minimum, family.size)

    def kept(self, removed: float) -> int:
        size = self.family.size
        kept = size - removed
        kept = math.floor(kept / self.step + 0.5) * self.step
        return int(min(max(kept, self.min_keep), size))


def allocate(graph: DependencyGraph, families: list[Family], scores: Mapping[str, torch.Tensor], ratio: float,
             target: Target = "params", strategy: WidthAllocation | None = None,
             overrides: Mapping[str, float] | None = None, default_normalize: Normalization = "mean",
             reserve: int = 0) -> WidthPlan:
    """Choose the units to remove so that ``ratio`` of the model's ``target`` goes.

    ``reserve`` is what later steps add back (biases created by FLAP's compensation), removed on top."""
    strategy = strategy or WidthAllocation()
    ratio = check_ratio(ratio)
    if target not in ("params", "macs"):
        raise PrunekitError(f"unknown target '{target}'; choose params or macs")
    if not families:
        raise nothing_to_prune(graph)
    measure = graph.parameter_count if target == "params" else graph.mac_count
    total = measure()
    if total == 0:
        raise PrunekitError(f"the model has no {target} to remove")
    notes: list[str] = []
    bounds = {f.name: _Bounds(f, strategy.floor, strategy.round_to) for f in families}
    if strategy.searched:
        if strategy.widths is None:
            raise PrunekitError(f"allocation {strategy.name} measures the model; run it through prune_structure "
                                "(prunekit shrink), or give its widths")
        plan = plan_from_widths(graph, families, scores, ratio, target, strategy.widths)
        # A search removes the least number of whole levels reaching the ratio: far more is another ratio's widths.
        if not ratio - 1e-9 <= plan.achieved <= ratio + _WIDTHS_SLACK:
            raise PrunekitError(f"the allocation's widths remove {plan.achieved:.2%} of the {target}, not the "
                                f"{ratio:.0%} asked: give ratio {plan.achieved:.4f}, or leave out the widths to "
                                "search again")
        return plan

    fixed: dict[str, int] = {}
    for pattern, value in (overrides or {}).items():
        value = check_ratio(value, f"override for '{pattern}'")
        matched = [f for f in families if f.matches([pattern])]
        if not matched:
            raise PrunekitError(f"override pattern '{pattern}' matches no prunable family")
        for family in matched:
            bound = bounds[family.name]
            kept = bound.kept(value * family.size)
            if family.size - value * family.size < bound.min_keep - 1e-9:
                notes.append(f"override {pattern}={value} would leave {family.name} below its floor; "
                             f"it keeps {kept} of {family.size} {family.unit}s")
            fixed[family.name] = family.size - kept
    free = [f for f in families if f.name not in fixed]

    if strategy.name == "global" and free:
        method = strategy.normalize or default_normalize
        # One unit's cost at the unpruned widths: exact for the first unit removed; a Linear between two
        # families makes later units of one cheaper as the other shrinks, which the ranking ignores.
        unit_costs = {f.name: total - measure({f.name: 1}) for f in free} if method == "cost" else None
        normalized = normalize_scores({f.name: scores[f.name] for f in free}, {f.name: f for f in free}, method,
                                      unit_costs)
        pooled = torch.sort(torch.cat(list(normalized.values()))).values

    def counts(t: float) -> dict[str, int]:
        result = dict(fixed)
        if strategy.name == "uniform":
            for family in free:
                result[family.name] = family.size - bounds[family.name].kept(t * family.size)
        else:
            threshold = math.inf if t >= 1.0 else float(pooled[min(int(t * len(pooled)), len(pooled) - 1)])
            for family in free:
                below = int((normalized[family.name] < threshold).sum())
                result[family.name] = family.size - bounds[family.name].kept(below)
        return result

    goal = ratio * total + (reserve if ratio > 0 else 0)
    if total - measure(counts(1.0)) < goal - 1e-9:
        reachable = 1 - measure(counts(1.0)) / total
        raise PrunekitError(f"a ratio of {ratio:.0%} of the {target} cannot be reached: with every family at its "
                            f"floor ({strategy.floor:.0%} of its units{', ' + str(len(fixed)) + ' overridden' if fixed else ''}) "
                            f"at most {reachable:.1%} can be removed; lower the ratio, the floor, or add granularities"
                            + _left_whole(graph))
    low, high = 0.0, 1.0
    if total - measure(counts(0.0)) >= goal:
        high = 0.0
    else:
        for _ in range(48):
            middle = (low + high) / 2
            if total - measure(counts(middle)) >= goal:
                high = middle
            else:
                low = middle
    chosen = counts(high)
    removal: dict[str, list[int]] = {}
    widths: dict[str, tuple[int, int]] = {}
    for family in families:
        count = chosen.get(family.name, 0)
        widths[family.name] = (family.size, family.size - count)
        if count:
            removal[family.name] = _lowest(family, scores[family.name], count)
    return WidthPlan(removal, widths, target, ratio, total, measure(chosen), notes)


def plan_from_widths(graph: DependencyGraph, families: list[Family], scores: Mapping[str, torch.Tensor], ratio: float,
                     target: Target, widths: Mapping[str, int], notes: list[str] | None = None) -> WidthPlan:
    """The plan keeping ``widths[family]`` units of every family (its lowest-scored units removed); a family
    ``widths`` does not name is kept whole, a name that matches no family is refused."""
    measure = graph.parameter_count if target == "params" else graph.mac_count
    known = {f.name for f in families}
    unknown = sorted(set(widths) - known)
    if unknown:
        raise PrunekitError(f"the allocation's widths name '{unknown[0]}', which is no prunable family of this model; "
                            "search again")
    removal: dict[str, list[int]] = {}
    plan_widths: dict[str, tuple[int, int]] = {}
    counts: dict[str, int] = {}
    for family in families:
        kept = int(widths.get(family.name, family.size))
        if not 1 <= kept <= family.size or (family.size - kept) % family.groups:
            raise PrunekitError(f"{family.name} cannot keep {kept} of its {family.size} {family.unit}s"
                                + (f" (it removes the same number from each of its {family.groups} groups)"
                                   if family.groups > 1 else ""))
        plan_widths[family.name] = (family.size, kept)
        if kept < family.size:
            counts[family.name] = family.size - kept
            removal[family.name] = _lowest(family, scores[family.name], family.size - kept)
    return WidthPlan(removal, plan_widths, target, ratio, measure(), measure(counts), list(notes or []))


def nothing_to_prune(graph: DependencyGraph) -> PrunekitError:
    return PrunekitError("nothing to prune: no family of the chosen granularities is left "
                         + (_left_whole(graph).strip() or "(check --ignore)"))


def _left_whole(graph: DependencyGraph) -> str:
    """Why the reachable ratio is low when part of the model is left whole (fused experts, mixers)."""
    inside = graph.whole_parameters()
    if not inside:
        return ""
    share = inside / graph.parameter_count()
    return f" ({share:.0%} of the parameters lie in parts left whole: {'; '.join(dict.fromkeys(graph.whole.values()))})"


def unit_ranks(family: Family, scores: torch.Tensor) -> torch.Tensor:
    """Every unit's position in its group's stable ascending order of scores (the whole family when it has no
    groups): the lowest ``k`` of each group are the units of rank below ``k``, nested as ``k`` grows."""
    scores = scores.double()
    per_group = family.size // max(family.groups, 1)
    ranks = torch.empty(family.size, dtype=torch.long)
    for start in range(0, family.size, per_group):
        order = torch.argsort(scores[start:start + per_group], stable=True)
        ranks[start + order] = torch.arange(order.numel())
    return ranks


def _lowest(family: Family, scores: torch.Tensor, count: int) -> list[int]:
    """The ``count`` lowest-scoring units, in index order; with groups, the same number from every group."""
    each = count // max(family.groups, 1)
    return torch.nonzero(unit_ranks(family, scores) < each).flatten().tolist()
