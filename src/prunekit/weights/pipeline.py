"""One-shot weight pruning of a model: choose targets, allocate sparsity, calibrate, prune."""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from prunekit.core.allocation import Allocation, LayerInfo, apply_overrides, get_allocation
from prunekit.core.allocation.base import name_matches
from prunekit.core.calibration import HEAD, SequentialCalibration, StatsReducer, Target, group_by_block
from prunekit.core.masks import sparsity_of
from prunekit.core.patterns import SparsityPattern
from prunekit.core.progress import progress_bar
from prunekit.core.statistics import InputNorms, LayerStatistics, TwinInputHessian
from prunekit.errors import PrunekitError
from prunekit.models.base import ModelAdapter, adapter_for
from prunekit.models.layout import is_linear_like
from prunekit.weights.base import OneShotMethod, get_method
from prunekit.weights.lowrank import LowRankCorrection, build_correction
from prunekit.weights.recipe import PruneSettings


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
    lowrank: dict | None = None  # the low-rank correction (weights.lowrank.CorrectionResult), if one was fitted

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


def untie_head(model: nn.Module, adapter: ModelAdapter) -> None:
    """Give the head its own copy of the tied embedding (pruning either half alone stores both from then on)."""
    head = adapter.head()
    head.weight = nn.Parameter(adapter.embeddings().weight.detach().clone())
    if hasattr(model, "config"):
        model.config.tie_word_embeddings = False
        text_config = getattr(model.config, "get_text_config", lambda: None)()
        if text_config is not None:
            text_config.tie_word_embeddings = False


def _needs_untie(adapter: ModelAdapter, targets: list[Target], untie: bool) -> bool:
    touches = [t for t in targets if t.module is adapter.head() or t.module is adapter.embeddings()]
    if not touches or not adapter.heads_are_tied():
        return False
    if len(touches) == 2:
        raise PrunekitError("lm_head and the input embedding share one tensor; target one of them, not both")
    if not untie:
        raise PrunekitError(f"{touches[0].name} shares its weight with the tied "
                            f"{'input embedding' if touches[0].block == HEAD else 'lm_head'}; "
                            "pass --untie-embeddings to prune it alone")
    return True


def check_finite_weights(model: nn.Module, targets: Sequence[Target] | None = None) -> None:
    """Refuse NaN or inf in the model's weights, or only in the targets' weights.

    Checking only what will be pruned matters for memory: reading a memory-mapped tensor (a
    large embedding, say) pages all of it in, and calibration would otherwise touch only the
    rows it uses. Non-finite weights elsewhere in the blocks still surface as non-finite
    activations, which calibration refuses by block.
    """
    if targets is not None:
        check_finite(targets)
        return
    for name, parameter in model.named_parameters():
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
    """Prunes each target at its allocated ratio when its statistics are complete; a ``correction``
    (``weights.lowrank``) then fits the layer's pruning error from the same statistics."""

    def __init__(self, method: OneShotMethod, ratios: Mapping[str, float], pattern: SparsityPattern,
                 correction: LowRankCorrection | None = None, asymmetric: bool = False,
                 asymmetric_dampening: float = 0.1):
        self.method, self.ratios, self.pattern, self.correction = method, ratios, pattern, correction
        self.asymmetric, self.asymmetric_dampening = asymmetric, asymmetric_dampening
        self.unreached_targets: list[str] = []

    def statistics(self, target: Target) -> type[LayerStatistics] | None:
        if self.asymmetric:
            return TwinInputHessian  # X Xᵀ also carries the input norms Wanda reads
        if self.correction is not None:
            return self.correction.statistics
        return self.method.statistics

    def process(self, target: Target, stats: LayerStatistics | None) -> None:
        if isinstance(stats, TwinInputHessian):
            # From here on the layer's problem is W* in the X Xᵀ norm: its method and its correction see W*.
            target.weight.copy_(stats.dense_output_weight(target.weight, self.asymmetric_dampening))
        dense = target.weight.clone() if self.correction is not None else None
        self.method.prune(target.weight, stats, self.ratios[target.name], self.pattern)
        if self.correction is not None:
            ratio = self.ratios[target.name]
            # The statistics are a parameter: ARMOR re-prunes its transformed problem with its own.
            self.correction.fit(target, dense, stats, lambda weight, statistics=stats:
                                self.method.prune(weight, statistics, ratio, self.pattern))

    def block_done(self) -> None:
        """The block's outputs are computed: layers that carried their corrected weight for the stream get their
        sparse weight back."""
        if self.correction is not None:
            self.correction.restore()

    def unreached(self, target: Target) -> None:
        """An expert no calibration token reached: pruned by magnitude (nothing else is known of it), and named."""
        from prunekit.weights.base import get_method

        self.unreached_targets.append(target.name)
        get_method("magnitude").prune(target.weight, None, self.ratios[target.name], self.pattern)


@dataclass
class PrunePlan:
    """A validated pruning job on one model: what to prune, how, and how much overall.

    Built once (``plan_pruning``) from the settings and the model's shapes (it may live on the meta
    device), then handed to every step.
    """

    settings: PruneSettings
    method: OneShotMethod
    pattern: SparsityPattern
    allocation: Allocation
    ratio: float
    targets: list[Target]
    adapter: ModelAdapter
    untie: bool = False
    correction: LowRankCorrection | None = None

    @property
    def calibrated(self) -> bool:
        """Whether the targets are pruned from their calibration statistics (the method's, or the correction's)."""
        return self.method.needs_calibration or self.correction is not None

    @property
    def needs_data(self) -> bool:
        return self.calibrated or "activations" in self.allocation.needs

    @property
    def sparsity(self) -> float:  # the name before the vocabulary settled on "ratio"
        return self.ratio

    def active(self, ratios: Mapping[str, float]) -> list[Target]:
        return [t for t in self.targets if ratios[t.name] > 0]


def pruning_settings(method: Any = None, ratio: float | None = None, **settings: Any) -> PruneSettings:
    """The settings of ``prune_weights`` from a ``PruneSettings`` (or a job recipe), or from keywords."""
    if isinstance(method, PruneSettings):
        if ratio is not None or settings:
            raise PrunekitError("give the settings either as a PruneSettings object or as keywords, not both")
        return method.pruning()
    values = {key: value for key, value in settings.items() if value is not None}  # "sparsity" warns, then maps
    if method is not None:
        values["method"] = method
    if ratio is not None:
        values["ratio"] = ratio
    return PruneSettings.build(values, where="pruning settings")


def plan_pruning(model: nn.Module, settings: PruneSettings, has_calibration: bool = True) -> PrunePlan:
    """Check every setting against the model (shapes only: it may live on the meta device)."""
    method = get_method(settings.method)
    pattern = SparsityPattern.parse(settings.pattern)
    allocation = get_allocation(settings.allocation)
    adapter = adapter_for(model, blocks=settings.blocks)
    targets = select_targets(model, adapter, settings.include, settings.exclude)
    untie = _needs_untie(adapter, targets, settings.untie_embeddings)
    if pattern.is_nm:
        for target in targets:
            pattern.check_width(target.name, target.in_features)
    correction = build_correction(settings.lowrank)
    plan = PrunePlan(settings, method, pattern, allocation, settings.effective_ratio, targets, adapter, untie,
                     correction)
    if plan.needs_data and not has_calibration:
        needer = (method.name if method.needs_calibration else "the low-rank correction" if correction
                  else f"allocation {allocation.name}")
        raise PrunekitError(f"{needer} needs calibration data")
    if plan.calibrated:
        outside = [t.name for t in targets if t.block is None]
        if outside:
            needer = method.name if method.needs_calibration else "the low-rank correction"
            raise PrunekitError(f"{needer} needs the inputs of {outside[0]}, which calibration does not see; "
                                "prune embeddings with magnitude")
    if settings.asymmetric and not plan.calibrated:
        raise PrunekitError(f"asymmetric calibration fits each layer to the dense model's output on calibration "
                            f"data, and {method.name} reads none; leave out --asymmetric")
    if "scores" in allocation.needs and (not method.comparable_across_layers or method.needs_calibration):
        raise PrunekitError(f"allocation '{allocation.name}' ranks scores across layers, but {method.name}'s "
                            "scores are only comparable within a layer; use magnitude, or uniform/owl")
    return plan


def allocate_ratios(plan: PrunePlan, weight_of: Callable[[str], torch.Tensor],
                    dense_norms: Callable[[list[Target]], dict[str, torch.Tensor]] | None) -> dict[str, float]:
    """Per-layer ratios: the allocation's, then the explicit overrides.

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
    ratios = apply_overrides(plan.allocation.allocate(infos, plan.ratio, scores), plan.settings.overrides)
    if plan.pattern.is_nm:
        wrong = [n for n, s in ratios.items() if s not in (0.0, plan.pattern.sparsity)]
        if wrong:
            raise PrunekitError(f"with pattern {plan.pattern} a layer is either dense (0) or {plan.pattern.sparsity}; "
                                f"{wrong[0]} was given {ratios[wrong[0]]}")
    return ratios


class BlockSource:
    """Where the model's blocks come from and where they go once pruned: this one keeps the whole model in
    memory and prunes it in place. ``prunekit.weights.streaming`` loads each block from disk and writes it
    out as soon as it is pruned; both feed the same loop (``prune_blocks``)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def loaded(self, *modules: nn.Module):
        return contextlib.nullcontext()

    def capture_modules(self) -> list[nn.Module]:
        """What must be in memory to capture the first block's inputs."""
        return []

    def outside_modules(self) -> list[nn.Module]:
        """What must be in memory to prune the targets outside the blocks (the head sees the model's own code)."""
        return []

    def block_loaded(self, index: int, block: nn.Module) -> None:
        """Block ``index`` is in memory, not yet pruned."""

    def block_done(self, index: int, block: nn.Module, steps: SequentialCalibration) -> None:
        """Block ``index`` is pruned (and, calibrated, ``steps`` holds its outputs)."""

    def outside_done(self, targets: list[Target]) -> None:
        """The targets outside the blocks are pruned (or there were none)."""


def check_finite(targets: Sequence[Target]) -> None:
    for target in targets:
        weight = target.weight
        if weight.is_floating_point() and not torch.isfinite(weight).all():
            raise PrunekitError(f"weight {target.name} contains NaN or inf; refusing to prune a broken model")


def prune_blocks(plan: PrunePlan, source: BlockSource, ratios: Mapping[str, float],
                 calibration: torch.Tensor | None, *, reduce: StatsReducer | None = None, first: int = 0,
                 inputs=None, outside: bool = True) -> Pruner:
    """The one loop of one-shot pruning: block by block (from ``first``, with ``inputs`` the activations saved
    before it), then the targets outside the blocks. Every weight is checked finite as its block is loaded."""
    settings = plan.settings
    pruner = Pruner(plan.method, ratios, plan.pattern, plan.correction, settings.asymmetric,
                    settings.asymmetric_dampening)
    calibrated = plan.calibrated
    active = plan.active(ratios)
    by_block = group_by_block([t for t in active if t.block is not None and t.block != HEAD])
    blocks = plan.adapter.blocks()
    steps = SequentialCalibration(plan.adapter, pruner, settings.sequential, reduce, twin=settings.asymmetric)
    head_targets = [t for t in active if t.block == HEAD]
    if calibrated and (first < len(blocks) or (outside and head_targets)):
        if inputs is not None:
            steps.attach(source.model, calibration, settings.batch_size)
            steps.inputs = inputs
        else:
            with source.loaded(*source.capture_modules()):
                steps.capture(source.model, calibration, settings.batch_size)
    with progress_bar(f"Pruning ({plan.method.name})", len(blocks)) as bar:
        bar.advance(first)
        for index in range(first, len(blocks)):
            block = blocks[index]
            targets = by_block.get(index, [])
            with source.loaded(block):
                source.block_loaded(index, block)
                check_finite([t for t in plan.targets if t.block == index])
                if calibrated:
                    steps.run_block(index, block, targets)
                else:
                    with torch.no_grad():
                        for target in targets:
                            pruner.process(target, None)
                pruner.block_done()
                source.block_done(index, block, steps)
            bar.advance()
    if outside:
        outside_targets = [t for t in plan.targets if t.block is None or t.block == HEAD]
        if outside_targets:
            with source.loaded(*source.outside_modules()):
                if plan.untie:
                    untie_head(source.model, plan.adapter)
                check_finite(outside_targets)
                if head_targets and calibrated:
                    steps.run_head(head_targets)
                with torch.no_grad():
                    for target in outside_targets:
                        if (target.block is None or not calibrated) and ratios[target.name] > 0:
                            pruner.process(target, None)
                pruner.block_done()
                source.outside_done(outside_targets)
        else:
            source.outside_done([])
    steps.inputs = None
    return pruner


def dense_norms_pass(plan: PrunePlan, source: BlockSource, calibration: torch.Tensor,
                     reduce: StatsReducer | None = None):
    """OWL's dense pass: every block run once, unpruned, recording its targets' input norms."""

    def dense_norms(targets: list[Target]) -> dict[str, torch.Tensor]:
        collector = NormCollector()
        steps = SequentialCalibration(plan.adapter, collector, "dense", reduce)
        by_block = group_by_block(targets)
        blocks = plan.adapter.blocks()
        with source.loaded(*source.capture_modules()):
            steps.capture(source.model, calibration, plan.settings.batch_size)
        stop = len(blocks) if HEAD in by_block else max((b for b in by_block if b != HEAD), default=-1) + 1
        with progress_bar("Outlier scores", stop) as bar:
            for index in range(stop):
                with source.loaded(blocks[index]):
                    steps.run_block(index, blocks[index], by_block.get(index, []))
                bar.advance()
        if HEAD in by_block:
            with source.loaded(*source.outside_modules()):
                steps.run_head(by_block[HEAD])
        return collector.norms

    return dense_norms


def prune_result(plan: PrunePlan, layers: list[LayerResult], pruner: Pruner | None, started: float,
                 calibration: torch.Tensor | None, allocation_seconds: float = 0.0) -> PruneResult:
    return PruneResult(method=plan.method.settings(), pattern=str(plan.pattern), allocation=plan.allocation.settings(),
                       sparsity=plan.ratio,
                       sequential=(plan.settings.sequential + (", asymmetric" if plan.settings.asymmetric else "")
                                   if plan.calibrated else "none"),
                       layers=layers, seconds=time.perf_counter() - started, allocation_seconds=allocation_seconds,
                       calibration_windows=int(calibration.shape[0]) if calibration is not None and plan.needs_data
                       else 0, unreached_experts=list(pruner.unreached_targets) if pruner else [])


def prune_weights(model: nn.Module, method: Any = None, ratio: float | None = None, *,
                  calibration: torch.Tensor | None = None, reduce: StatsReducer | None = None,
                  **settings: Any) -> PruneResult:
    """Prune ``model`` in place (like ``torch.nn.utils.prune``); copy it first to keep the original.

    ``method`` is a name, ``{name: settings}`` or a ``PruneSettings`` holding every setting; otherwise the
    other settings (``pattern``, ``allocation``, ``include``, ``exclude``, ``overrides``, ``sequential``,
    ``batch_size``, ``untie_embeddings``, ``blocks``) are keywords. ``calibration`` is a (samples, seq_len)
    tensor of token ids, needed by calibrated methods and by OWL. With an N:M ``pattern`` the ratio is the
    pattern's own (1 - N/M). ``reduce`` combines statistics across processes (``prunekit.core.distributed``).
    """
    started = time.perf_counter()
    plan = plan_pruning(model, pruning_settings(method, ratio, **settings), calibration is not None)
    check_finite(plan.targets)  # in memory, before any work; a stream checks each block as it loads it
    source = BlockSource(model)
    alloc_started = time.perf_counter()
    by_name = {t.name: t for t in plan.targets}
    norms = dense_norms_pass(plan, source, calibration, reduce) if calibration is not None else None
    ratios = allocate_ratios(plan, lambda name: by_name[name].weight, norms)
    allocation_seconds = time.perf_counter() - alloc_started if plan.allocation.needs else 0.0
    pruner = prune_blocks(plan, source, ratios, calibration, reduce=reduce)
    result = prune_result(plan, [layer_result(t, ratios[t.name]) for t in plan.targets], pruner, started,
                          calibration, allocation_seconds)
    if plan.correction is not None:
        result.lowrank = plan.correction.attach(model).to_dict()
        result.seconds = time.perf_counter() - started
    return result


def describe(item: OneShotMethod | Allocation) -> dict:
    return item.settings()


def layer_result(target: Target, allocated: float, weight: torch.Tensor | None = None) -> LayerResult:
    weight = target.weight if weight is None else weight
    return LayerResult(target.name, tuple(weight.shape), target.block, allocated, sparsity_of(weight.detach()))
