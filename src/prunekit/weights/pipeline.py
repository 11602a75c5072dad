"""One-shot weight pruning of a model: choose targets, allocate sparsity, calibrate, prune."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from prunekit.core.allocation import Allocation, LayerInfo, apply_overrides, get_allocation
from prunekit.core.allocation.base import name_matches
from prunekit.core.calibration import HEAD, StatsReducer, Target, run_sequential
from prunekit.core.masks import sparsity_of
from prunekit.core.patterns import SparsityPattern, check_sparsity
from prunekit.core.progress import track
from prunekit.core.statistics import InputNorms, LayerStatistics
from prunekit.errors import PrunekitError
from prunekit.models.base import ModelAdapter, adapter_for
from prunekit.models.layout import is_linear_like
from prunekit.weights.base import OneShotMethod, get_method


@dataclass
class LayerResult:
    name: str
    shape: tuple[int, ...]
    block: int | None
    target_sparsity: float
    achieved_sparsity: float


@dataclass
class PruneResult:
    method: dict
    pattern: str
    allocation: dict
    sparsity: float
    sequential: str
    layers: list[LayerResult] = field(default_factory=list)
    seconds: float = 0.0
    allocation_seconds: float = 0.0
    calibration_windows: int = 0
    unreached_experts: list[str] = field(default_factory=list)  # no calibration token reached them: magnitude

    @property
    def achieved_sparsity(self) -> float:
        total = sum(_numel(layer.shape) for layer in self.layers)
        zeros = sum(layer.achieved_sparsity * _numel(layer.shape) for layer in self.layers)
        return zeros / max(total, 1)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["achieved_sparsity"] = self.achieved_sparsity
        data["target_parameters"] = sum(_numel(layer.shape) for layer in self.layers)
        return data


def _numel(shape: Sequence[int]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


def select_targets(model: nn.Module, adapter: ModelAdapter, include: Sequence[str] = (),
                   exclude: Sequence[str] = ()) -> list[Target]:
    """The blocks' weights by default (``ModelAdapter.block_weights``); ``include`` may also name the head
    or the embeddings."""
    head, embeddings = adapter.head(), adapter.embeddings()
    candidates: list[Target] = []
    for index in range(len(adapter.blocks())):
        candidates.extend(adapter.block_weights(index))
    if is_linear_like(head):
        candidates.append(Target(adapter.head_path, head, HEAD, transposed=type(head).__name__ == "Conv1D"))
    if isinstance(embeddings, nn.Embedding):
        candidates.append(Target(adapter.embeddings_path, embeddings, None))
    if include:
        chosen = [t for t in candidates if name_matches(t.name, list(include))]
    else:
        chosen = [t for t in candidates if t.block is not None and t.block >= 0]
    chosen = [t for t in chosen if not name_matches(t.name, list(exclude))]
    if not chosen:
        raise PrunekitError("no layer matches the include/exclude patterns"
                            + (f" (include: {', '.join(include)})" if include else ""))
    return chosen


def _untie(model: nn.Module, adapter: ModelAdapter) -> None:
    head = adapter.head()
    head.weight = nn.Parameter(head.weight.detach().clone())
    if hasattr(model, "config"):
        model.config.tie_word_embeddings = False
        text_config = getattr(model.config, "get_text_config", lambda: None)()
        if text_config is not None:
            text_config.tie_word_embeddings = False


def _check_tied(model: nn.Module, adapter: ModelAdapter, targets: list[Target], untie: bool) -> None:
    touches = [t for t in targets if t.module is adapter.head() or t.module is adapter.embeddings()]
    if not touches or not adapter.heads_are_tied():
        return
    if len(touches) == 2:
        raise PrunekitError("lm_head and the input embedding share one tensor; target one of them, not both")
    if not untie:
        raise PrunekitError(f"{touches[0].name} shares its weight with the tied "
                            f"{'input embedding' if touches[0].block == HEAD else 'lm_head'}; "
                            "pass --untie-embeddings to prune it alone")
    _untie(model, adapter)


def check_finite_weights(model: nn.Module, targets: Sequence[Target] | None = None) -> None:
    """Refuse NaN or inf in the model's weights, or only in the targets' weights.

    Checking only what will be pruned matters for memory: reading a memory-mapped tensor (a
    large embedding, say) pages all of it in, and calibration would otherwise touch only the
    rows it uses. Non-finite weights elsewhere in the blocks still surface as non-finite
    activations, which calibration refuses by block.
    """
    if targets is None:
        parameters = model.named_parameters()
    else:
        parameters = [(target.name, target.weight) for target in targets]
    for name, parameter in parameters:
        if parameter.is_floating_point() and not torch.isfinite(parameter).all():
            raise PrunekitError(f"weight {name} contains NaN or inf; refusing to prune a broken model")


class NormCollector:
    """A dense pass that only records input norms (OWL's outlier scores)."""

    def __init__(self) -> None:
        self.norms: dict[str, torch.Tensor] = {}

    def statistics(self, target: Target) -> type[LayerStatistics]:
        return InputNorms

    def process(self, target: Target, stats: LayerStatistics | None) -> None:
        assert isinstance(stats, InputNorms)
        self.norms[target.name] = stats.norms()


class Pruner:
    """Prunes each target at its allocated sparsity when its statistics are complete."""

    def __init__(self, method: OneShotMethod, sparsities: Mapping[str, float], pattern: SparsityPattern):
        self.method, self.sparsities, self.pattern = method, sparsities, pattern
        self.unreached_targets: list[str] = []

    def statistics(self, target: Target) -> type[LayerStatistics] | None:
        return self.method.statistics

    def process(self, target: Target, stats: LayerStatistics | None) -> None:
        self.method.prune(target.weight, stats, self.sparsities[target.name], self.pattern)

    def unreached(self, target: Target) -> None:
        """An expert no calibration token reached: pruned by magnitude (nothing else is known of it), and named."""
        from prunekit.weights.base import get_method

        self.unreached_targets.append(target.name)
        get_method("magnitude").prune(target.weight, None, self.sparsities[target.name], self.pattern)


@dataclass
class PrunePlan:
    """A validated pruning job on one model: what to prune, how, and how much overall."""

    method: OneShotMethod
    pattern: SparsityPattern
    allocation: Allocation
    sparsity: float
    targets: list[Target]
    adapter: ModelAdapter

    @property
    def needs_data(self) -> bool:
        return self.method.needs_calibration or "activations" in self.allocation.needs


def plan_pruning(model: nn.Module, method: str | Mapping[str, Any] | OneShotMethod = "wanda",
                 sparsity: float | None = 0.5, pattern: str | SparsityPattern | None = None,
                 allocation: str | Mapping[str, Any] | Allocation = "uniform", include: Sequence[str] = (),
                 exclude: Sequence[str] = (), untie_embeddings: bool = False,
                 has_calibration: bool = True) -> PrunePlan:
    """Check every setting against the model (shapes only: it may live on the meta device)."""
    method = get_method(method)
    pattern = SparsityPattern.parse(pattern)
    allocation = get_allocation(allocation)
    if pattern.is_nm:
        if sparsity is not None and abs(float(sparsity) - pattern.sparsity) > 1e-9:
            raise PrunekitError(f"sparsity {sparsity} conflicts with pattern {pattern}, which is "
                                f"{pattern.sparsity:.0%} sparse; leave the sparsity out")
        if allocation.name != "uniform":
            raise PrunekitError(f"pattern {pattern} fixes every layer's sparsity; allocation '{allocation.name}' does not apply")
        sparsity = pattern.sparsity
    if sparsity is None:
        raise PrunekitError("give a sparsity in [0, 1) or an N:M pattern")
    sparsity = check_sparsity(sparsity)
    adapter = adapter_for(model)
    targets = select_targets(model, adapter, include, exclude)
    _check_tied(model, adapter, targets, untie_embeddings)
    if pattern.is_nm:
        for target in targets:
            pattern.check_width(target.name, target.in_features)
    plan = PrunePlan(method, pattern, allocation, sparsity, targets, adapter)
    if plan.needs_data and not has_calibration:
        needer = method.name if method.needs_calibration else f"allocation {allocation.name}"
        raise PrunekitError(f"{needer} needs calibration data")
    if method.needs_calibration:
        outside = [t.name for t in targets if t.block is None]
        if outside:
            raise PrunekitError(f"{method.name} needs the inputs of {outside[0]}, which calibration does not see; "
                                "prune embeddings with magnitude")
    if "scores" in allocation.needs and (not method.comparable_across_layers or method.needs_calibration):
        raise PrunekitError(f"allocation '{allocation.name}' ranks scores across layers, but {method.name}'s "
                            "scores are only comparable within a layer; use magnitude, or uniform/owl")
    return plan


def allocate_sparsities(plan: PrunePlan, weight_of: Callable[[str], torch.Tensor],
                        dense_norms: Callable[[list[Target]], dict[str, torch.Tensor]] | None,
                        overrides: Mapping[str, float] | None = None) -> dict[str, float]:
    """Per-layer sparsities: the allocation's, then the explicit overrides.

    ``weight_of(name)`` gives a target's weight (from memory or from disk); ``dense_norms`` runs
    the unpruned model over the calibration data and returns every target's input norms.
    """
    infos = [LayerInfo(t.name, tuple(t.weight.shape), t.block) for t in plan.targets]
    scores: Callable[[str], torch.Tensor] | None = None
    if "scores" in plan.allocation.needs:
        def scores(name: str) -> torch.Tensor:
            return plan.method.scores(weight_of(name).detach().float(), None)
    elif "activations" in plan.allocation.needs:
        assert dense_norms is not None
        norms = dense_norms([t for t in plan.targets if t.block is not None])

        def scores(name: str) -> torch.Tensor:
            weight = weight_of(name).detach().float().abs()
            return weight if name not in norms else weight * norms[name].unsqueeze(0)
    sparsities = apply_overrides(plan.allocation.allocate(infos, plan.sparsity, scores), overrides)
    if plan.pattern.is_nm:
        wrong = [n for n, s in sparsities.items() if s not in (0.0, plan.pattern.sparsity)]
        if wrong:
            raise PrunekitError(f"with pattern {plan.pattern} a layer is either dense (0) or {plan.pattern.sparsity}; "
                                f"{wrong[0]} was given {sparsities[wrong[0]]}")
    return sparsities


def prune_weights(model: nn.Module, method: str | Mapping[str, Any] | OneShotMethod = "wanda",
                  sparsity: float | None = 0.5, pattern: str | SparsityPattern | None = None,
                  allocation: str | Mapping[str, Any] | Allocation = "uniform",
                  calibration: torch.Tensor | None = None, include: Sequence[str] = (), exclude: Sequence[str] = (),
                  overrides: Mapping[str, float] | None = None, sequential: str = "layer", batch_size: int = 4,
                  untie_embeddings: bool = False, reduce: StatsReducer | None = None) -> PruneResult:
    """Prune ``model`` in place (like ``torch.nn.utils.prune``); copy it first to keep the original.

    ``calibration`` is a (samples, seq_len) tensor of token ids, needed by calibrated methods
    and by OWL. With an N:M ``pattern`` the sparsity is the pattern's own (1 - N/M). ``reduce``
    combines statistics across processes (see ``prunekit.core.distributed``).
    """
    started = time.perf_counter()
    plan = plan_pruning(model, method, sparsity, pattern, allocation, include, exclude, untie_embeddings,
                        calibration is not None)
    check_finite_weights(model, plan.targets)
    by_name = {t.name: t for t in plan.targets}

    def dense_norms(targets: list[Target]) -> dict[str, torch.Tensor]:
        collector = NormCollector()
        run_sequential(model, plan.adapter, calibration, targets, collector, mode="dense", batch_size=batch_size,
                       description="Outlier scores", reduce=reduce)
        return collector.norms

    alloc_started = time.perf_counter()
    sparsities = allocate_sparsities(plan, lambda name: by_name[name].weight, dense_norms, overrides)
    allocation_seconds = time.perf_counter() - alloc_started if plan.allocation.needs else 0.0

    active = [t for t in plan.targets if sparsities[t.name] > 0]
    pruner = Pruner(plan.method, sparsities, plan.pattern)
    if plan.method.needs_calibration:
        run_sequential(model, plan.adapter, calibration, active, pruner, mode=sequential, batch_size=batch_size,
                       description=f"Pruning ({plan.method.name})", reduce=reduce)
    else:
        with torch.no_grad():
            for target in track(active, f"Pruning ({plan.method.name})"):
                pruner.process(target, None)
    return PruneResult(method=describe(plan.method), pattern=str(plan.pattern), allocation=describe(plan.allocation),
                       sparsity=plan.sparsity, sequential=sequential if plan.method.needs_calibration else "none",
                       layers=[layer_result(t, sparsities[t.name]) for t in plan.targets],
                       seconds=time.perf_counter() - started, allocation_seconds=allocation_seconds,
                       calibration_windows=int(calibration.shape[0]) if calibration is not None and plan.needs_data else 0,
                       unreached_experts=pruner.unreached_targets)


def describe(item: OneShotMethod | Allocation) -> dict:
    return {"name": item.name, **item.model_dump(by_alias=True)}


def layer_result(target: Target, allocated: float, weight: torch.Tensor | None = None) -> LayerResult:
    weight = target.weight if weight is None else weight
    return LayerResult(target.name, tuple(weight.shape), target.block, allocated, sparsity_of(weight.detach()))
