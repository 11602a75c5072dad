"""Structural pruning of any model in one call: trace, score, allocate, shrink.

>>> from prunekit.structure import prune_structure, classifier_calibration
>>> result = prune_structure(model, 0.5, example_inputs=(images[:2],), importance="taylor", target="macs",
...                          calibration=classifier_calibration(images[:512], labels[:512]))

Every setting of how width is removed lives in one ``WidthSettings`` (``ShrinkRecipe.width_settings()``
builds it from a recipe); settings given by keyword replace its values.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.models.base import ModelAdapter, adapter_for
from prunekit.structure.allocation import (Target, WidthAllocation, WidthPlan, allocate, check_ratio,
                                           check_search_combination, nothing_to_prune)
from prunekit.structure.graph import KINDS, DependencyGraph, build_graph
from prunekit.structure.heads import HeadMode
from prunekit.structure.importance.base import Importance, ScoringContext, get_importance, is_consumer
from prunekit.structure.reconstruct import DEFAULT_DAMPING, reconstruct as reconstruct_layers
from prunekit.structure.search import search_widths, width_grid
from prunekit.structure.shrink import ShrinkResult, compensation_targets, shrink
from prunekit.structure.statistics import accumulate_gradients, input_moments

GRANULARITY_ALIASES = {"channels": "channels", "neurons": "channels", "heads": "heads", "hidden": "hidden",
                       "width": "hidden"}


@dataclass
class Calibration:
    """Data for activation statistics and gradients: model inputs batch by batch, and a loss."""

    batches: Sequence[Any]  # each a tuple of positional or a dict of keyword model inputs
    loss_fn: Callable[[nn.Module, Any, Any], torch.Tensor] | None = None  # (model, batch, target) -> loss
    targets: Sequence[Any] | None = None  # aligned with batches (labels), when the loss needs them
    windows: torch.Tensor | None = None  # token ids, for block-by-block calibration of language models
    batch_size: int = 4
    # Batches are dicts of equal-length samples whose loss is a mean over them: gradients may then be
    # taken one sample at a time (the same sum, a fraction of the memory of vocabulary-wide logits).
    one_sample_gradients: bool = False


def _lm_loss(model: nn.Module, batch: dict, _target) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], labels=batch["input_ids"], use_cache=False).loss


def _classifier_loss(model: nn.Module, batch: tuple, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(*batch), target)


def lm_calibration(windows: torch.Tensor, batch_size: int = 4) -> Calibration:
    """Calibration from token windows (samples, seq_len) for a causal language model."""
    batches = [{"input_ids": windows[i:i + batch_size], "use_cache": False}
               for i in range(0, windows.shape[0], batch_size)]
    return Calibration(batches, _lm_loss, None, windows, batch_size, one_sample_gradients=True)


def encoder_calibration(windows: torch.Tensor, batch_size: int = 8) -> Calibration:
    """Calibration for an encoder without a training objective (no Taylor scores)."""
    batches = [{"input_ids": windows[i:i + batch_size]} for i in range(0, windows.shape[0], batch_size)]
    return Calibration(batches, None, None, None, batch_size)


def classifier_calibration(inputs: torch.Tensor, labels: torch.Tensor | None = None,
                           batch_size: int = 128) -> Calibration:
    """Calibration from images (or any inputs) and, for Taylor scores, their labels."""
    starts = range(0, inputs.shape[0], batch_size)
    batches = [(inputs[i:i + batch_size],) for i in starts]
    if labels is None:
        return Calibration(batches, None, None, None, batch_size)
    return Calibration(batches, _classifier_loss, [labels[i:i + batch_size] for i in starts], None, batch_size)


def lm_example_inputs(tokens: int = 4) -> dict:
    """A short token batch for tracing a language model (its channels do not depend on the length)."""
    return {"input_ids": torch.arange(1, tokens + 1).unsqueeze(0), "use_cache": False}


@dataclass
class StructuredResult:
    plan: WidthPlan
    shrink: ShrinkResult
    families: list[dict]
    importance: dict
    allocation: dict
    granularity: list[str]
    head_mode: str
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    search: dict | None = None  # what a knapsack/evolutionary width search did (structure.search.WidthSearch)

    def to_dict(self) -> dict:
        return {"plan": self.plan.to_dict(), "shrink": self.shrink.to_dict(), "families": self.families,
                "importance": self.importance, "allocation": self.allocation, "granularity": self.granularity,
                "head_mode": self.head_mode, "notes": self.notes, "seconds": self.seconds, "search": self.search}


def resolve_granularity(granularity: Iterable[str] | str) -> list[str]:
    items = [granularity] if isinstance(granularity, str) else list(granularity)
    result = []
    for item in items:
        for part in str(item).split(","):
            part = part.strip().lower()
            if not part:
                continue
            if part not in GRANULARITY_ALIASES:
                raise PrunekitError(f"unknown granularity '{part}'; choose from channels (neurons), heads, hidden")
            kind = GRANULARITY_ALIASES[part]
            if kind not in result:
                result.append(kind)
    if not result:
        raise PrunekitError("choose at least one granularity: channels (neurons), heads, hidden")
    return result


@dataclass(frozen=True)
class WidthSettings:
    """How ``prune_structure`` removes width, checked and normalised once when made.

    ``ratio`` of the parameters (``target="params"``) or MACs is removed as whole units of the
    ``granularity`` kinds, ranked by ``importance`` and spread by ``allocation``; ``ignore`` names
    modules or families (globs, ``re:`` regexes) to leave whole and ``overrides`` fixes the removed
    fraction of matching families. ``head_mode`` forms grouped-query head units (whole KV groups, or
    query heads equally from every group); ``strict`` refuses operations the tracer does not know
    (else their channels stay whole); ``check`` verifies the shrunk shapes. ``reconstruct`` refits the
    Linear layers reading removed channels by least squares on the calibration data (ridge ``damping``),
    replacing FLAP's bias compensation.
    """

    ratio: float = 0.2
    importance: Importance = field(default_factory=lambda: get_importance("l2"))
    granularity: tuple[str, ...] = ("channels", "heads")
    target: Target = "params"
    allocation: WidthAllocation = field(default_factory=WidthAllocation)
    head_mode: HeadMode = "kv"
    ignore: tuple[str, ...] = ()
    overrides: Mapping[str, float] = field(default_factory=dict)
    seed: int = 0
    strict: bool = True
    check: bool = True
    reconstruct: bool = False
    damping: float = DEFAULT_DAMPING

    def __post_init__(self) -> None:
        allocation = self.allocation
        if isinstance(allocation, str):
            allocation = {"name": allocation}
        if not isinstance(allocation, WidthAllocation):
            allocation = WidthAllocation(**(allocation or {}))
        if self.target not in ("params", "macs"):
            raise PrunekitError(f"the target must be params or macs, got '{self.target}'")
        if self.head_mode not in ("kv", "query"):
            raise PrunekitError(f"the heads mode must be kv or query, got '{self.head_mode}'")
        if not 0 < self.damping <= 100:
            raise PrunekitError(f"the reconstruction damping must lie in (0, 100], got {self.damping}")
        normalised = {"ratio": check_ratio(self.ratio), "importance": get_importance(self.importance),
                      "granularity": tuple(resolve_granularity(self.granularity)), "allocation": allocation,
                      "ignore": tuple(self.ignore), "overrides": dict(self.overrides or {})}
        for name, value in normalised.items():
            object.__setattr__(self, name, value)
        check_search_combination(allocation, self.reconstruct, self.overrides,
                                 self.importance.compensation())

    @classmethod
    def of(cls, settings: "WidthSettings | None" = None, **changes: Any) -> "WidthSettings":
        """``settings`` (default: the defaults) with ``changes`` replacing its values."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise PrunekitError(f"unknown structural pruning setting '{unknown[0]}'; the settings are: "
                                + ", ".join(f.name for f in dataclasses.fields(cls)))
        if settings is None:
            return cls(**changes)
        return dataclasses.replace(settings, **changes) if changes else settings


def _adapter(model: nn.Module, adapter: ModelAdapter | str | None) -> ModelAdapter | None:
    if adapter != "auto":
        return adapter  # type: ignore[return-value]
    if getattr(getattr(model, "config", None), "model_type", None) is None:
        return None
    try:
        return adapter_for(model)
    except PrunekitError:
        return None


def score_families(graph: DependencyGraph, families, importance: Importance, calibration: Calibration | None,
                   adapter: ModelAdapter | None, seed: int = 0) -> tuple[dict[str, torch.Tensor], ScoringContext]:
    model = graph.model
    context = ScoringContext(graph, seed=seed)
    needs_moments = "moments" in importance.needs or importance.compensation()
    needs_loss = bool(importance.needs & {"gradients", "sample_gradients"})
    if needs_moments or needs_loss:
        if calibration is None:
            raise PrunekitError(f"importance '{importance.name}' needs calibration data")
    if needs_moments:
        consumers = _consumers(graph, families)
        context.moments = input_moments(model, graph, consumers, calibration.batches, adapter=adapter,
                                        windows=calibration.windows, batch_size=calibration.batch_size)
    if needs_loss and calibration.loss_fn is None:
        raise PrunekitError(f"importance '{importance.name}' needs a loss: give labels (classifiers) or use a "
                            "language model; encoders without a task have no gradients to score with")
    if "gradients" in importance.needs:
        tensors = sorted({m.tensor for f in families for m in f.members if not graph.tensors[m.tensor].is_buffer})
        context.gradients = accumulate_gradients(model, calibration.batches, calibration.loss_fn, tensors,
                                                 calibration.targets, calibration.one_sample_gradients)
    if "sample_gradients" in importance.needs:
        accumulator = importance.per_sample(list(families), context)
        accumulate_gradients(model, calibration.batches, calibration.loss_fn, accumulator.tensors, calibration.targets,
                             each_sample=accumulator)  # splits every batch into single samples
        context.per_sample = accumulator.result()
    return {f.name: importance.score(f, context) for f in families}, context


def check_plan(graph: DependencyGraph, settings: WidthSettings | None = None, **changes: Any) -> None:
    """Fail fast, before any slow calibration, on requests no scores could satisfy (unreachable ratios,
    overrides that match nothing, everything ignored)."""
    settings = WidthSettings.of(settings, **changes)
    families = graph.select(list(settings.granularity), settings.ignore)
    strategy = settings.allocation
    if strategy.searched and strategy.widths is None:
        if not families:
            raise nothing_to_prune(graph)
        width_grid(graph, families, settings.ratio, settings.target, strategy, strategy.measured())
        return
    zeros = {f.name: torch.zeros(f.size, dtype=torch.float64) for f in families}
    allocate(graph, families, zeros, settings.ratio, settings.target, settings.allocation, settings.overrides)


def _consumers(graph: DependencyGraph, families) -> list[str]:
    context = ScoringContext(graph)
    return sorted({m.tensor for f in families for m in f.members if is_consumer(context, m)})


def _compensation_biases(graph: DependencyGraph, families, adapter: ModelAdapter | None) -> int:
    """Parameters FLAP's compensation will add: a bias for every consumer without one (and, for a
    config flag to describe them, for its siblings), counted at today's widths (an upper bound)."""
    modules = set()
    for name in compensation_targets(graph, _consumers(graph, families), adapter).values():
        modules.update(adapter.bias_siblings(name) if adapter is not None else [name])
    total = 0
    for name in modules:
        module = graph.model.get_submodule(name) if name else graph.model
        if getattr(module, "bias", "missing") is None:
            total += module.weight.shape[0]
    return total


def _uncompensated(graph: DependencyGraph, families, adapter: ModelAdapter | None) -> list[str]:
    """Layers that read pruned channels but take no compensation bias (output heads, tied tables)."""
    consumers = _consumers(graph, families)
    targets = compensation_targets(graph, consumers, adapter)
    modules = {call.weight: call.module for call in graph.calls if call.kind in ("linear", "conv")}
    return sorted({modules.get(w, w) or "<root>" for w in consumers if w not in targets})


def prune_structure(model: nn.Module, ratio: float | None = None, *, example_inputs: tuple | dict,
                    settings: WidthSettings | None = None, calibration: Calibration | None = None,
                    adapter: ModelAdapter | str | None = "auto", graph: DependencyGraph | None = None,
                    **changes: Any) -> StructuredResult:
    """Remove ``ratio`` of the model's parameters (or MACs) as whole channels, heads or hidden width, in place.

    ``settings`` (a ``WidthSettings``) says how; ``ratio`` and the settings given by keyword
    (``importance="taylor"``, ``target="macs"``, ...) replace its values. ``example_inputs`` is one
    small batch (a tuple of positional or a dict of keyword arguments) used to trace the model;
    ``calibration`` feeds what the importance criterion needs (activation statistics, gradients) and
    the reconstruction. ``graph`` reuses a graph already built for this model in its current state.
    """
    if ratio is not None:
        changes["ratio"] = ratio
    settings = WidthSettings.of(settings, **changes)
    importance, kinds, strategy = settings.importance, list(settings.granularity), settings.allocation
    if settings.reconstruct and calibration is None:
        raise PrunekitError("reconstruction refits layers on calibration data: give calibration")
    adapter = _adapter(model, adapter)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    if graph is None:
        graph = build_graph(model, example_inputs, adapter=adapter, head_mode=settings.head_mode, strict=settings.strict)
    timings["graph_seconds"] = time.perf_counter() - started
    families = graph.select(kinds, settings.ignore)
    if not families:  # before any calibration: criteria have nothing to score
        raise nothing_to_prune(graph)
    notes = list(graph.frozen)
    if "heads" in kinds and not any(f.kind == "heads" for f in graph.families):
        notes.append("no attention heads were found that prunekit knows how to remove")
    inexact = [f.name for f in families if not f.exact]
    if inexact:
        notes.append(f"{len(inexact)} families are read by a statistic over channels (LayerNorm/RMSNorm): removing "
                     "them changes the remaining channels' normalisation, so it is not exact")
    started = time.perf_counter()
    scores, context = score_families(graph, families, importance, calibration, adapter, settings.seed)
    timings["scoring_seconds"] = time.perf_counter() - started
    started = time.perf_counter()
    default_normalize = importance.default_normalize
    compensating = importance.compensation() and not settings.reconstruct
    reserve = _compensation_biases(graph, families, adapter) if (compensating and settings.target == "params") else 0
    search = None
    if strategy.searched and strategy.widths is None:
        plan, found = search_widths(graph, adapter, families, scores, settings.ratio, settings.target, strategy,
                                    calibration.windows if calibration is not None else None, default_normalize)
        search = found.to_dict()
        timings["search_seconds"] = found.seconds["search"]
        started = time.perf_counter()  # applying starts after the search
    else:
        plan = allocate(graph, families, scores, settings.ratio, settings.target, strategy, settings.overrides,
                        default_normalize, reserve)
    compensation = None
    if settings.reconstruct:
        started_refit = time.perf_counter()
        refitted, left = reconstruct_layers(model, graph, plan.removal, calibration.batches, adapter,
                                            calibration.windows, calibration.batch_size, settings.damping)
        timings["reconstruct_seconds"] = time.perf_counter() - started_refit
        notes.append(f"reconstruction refitted {len(refitted)} layers by least squares on the calibration data")
        if left:
            notes.append(f"reconstruction left {', '.join(left)} as they are (convolutions, output heads, tied "
                         "tables and inputs normalised over the removed channels are not refitted)")
        if importance.compensation():
            notes.append(f"{importance.name}'s bias compensation was not applied: the reconstruction already "
                         "accounts for the removed channels")
    elif importance.compensation():
        compensation = {name: moments.mean() for name, moments in context.moments.items()}
        skipped = _uncompensated(graph, families, adapter)
        if skipped:
            notes.append(f"{importance.name} adds no compensation bias to {', '.join(skipped)} (output heads, tied "
                         "embedding tables and weights applied by several modules take none): the removed "
                         "channels' mean is lost there")
    result = shrink(graph, plan.removal, compensation, adapter, settings.check)
    timings["apply_seconds"] = time.perf_counter() - started
    return StructuredResult(plan, result, graph.summary(), importance.settings(),
                            {**strategy.model_dump(), "normalize": strategy.normalize or default_normalize},
                            kinds, settings.head_mode, notes + plan.notes, timings, search)


__all__ = ["Calibration", "KINDS", "StructuredResult", "WidthSettings", "check_plan", "classifier_calibration",
           "encoder_calibration", "lm_calibration", "lm_example_inputs", "prune_structure", "resolve_granularity",
           "score_families"]
