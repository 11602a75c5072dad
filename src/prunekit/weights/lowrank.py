"""Sparse + low-rank: after any one-shot method, a rank-r correction per pruned linear that absorbs its pruning error.

For a layer with dense weight ``W``, pruned weight ``S`` and calibration inputs ``X``, the correction ``L R``
minimises ``‖(W − S − L R) X‖_F`` (the layer's output error on the calibration stream): the truncated SVD
of the error in the whitened coordinates (``prunekit.core.lowrank.whitened_svd``). The statistics are the
``X Xᵀ`` SparseGPT already gathers (``InputHessian``), read right after the layer is pruned.

One budget of extra parameters (``budget`` × the targeted layers' parameters) is spread over the layers:

- ``uniform`` (default): every layer the same share of its own parameters. The rank is then known while the
  layer is pruned, so the sparse part and the correction are refined in turn (``iterations``): ``S`` re-pruned
  by the same method from ``W − L R`` (the low-rank part takes the directions the mask handles worst), ``L R``
  refitted to ``W − S``; the pair with the least error is kept, never worse than pruning once. On SmolLM2 this
  removed about twice as much of a layer's error as one correction of the first sparse part
  (docs/weights.md).
- ``global``: every layer's whole spectrum is fitted as it is pruned and the ranks are chosen when all layers
  are done, greedily by marginal error reduction per parameter, each layer's error measured relative to its
  dense output energy ``‖W X‖²`` (so layers with loud inputs do not take everything): rank ``i`` of layer
  ``l`` is worth ``s_{l,i}² / ‖W_l X_l‖²`` for ``out_l + in_l`` parameters. Within a layer the gains fall,
  so the greedy picks a prefix of each layer's ranks. No alternation (the ranks come too late for it).

No layer gets more than ``layer_cap`` of its own parameters. Each layer then takes, up to its allocated
rank, the rank with the least error in the undampened norm, so a correction never increases a layer's
error (the fit is exact in the dampened norm; the dampening alone could make a rank worse).

Which layers the sequential calibration stream runs through (``stream``): when a layer's rank is known as it
is pruned (``uniform``, and ARMOR), the corrected layer (``S + L R`` held as one dense weight until its block
has been run), so every later layer is pruned and corrected on the inputs the final model gives it; with
``global`` ranks, the plain sparse layers (the corrections come at the end), as the method alone would see.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from prunekit.core.calibration import Target
from prunekit.core.config import RecipeModel
from prunekit.core.lowrank import (Whitening, WhitenedSVD, attach_correction, output_energy, rank_for_fraction,
                                   refit_kept_values, whitened_svd, whitening_factor)
from prunekit.core.statistics import InputHessian, LayerStatistics
from prunekit.errors import PrunekitError


class LowRankSettings(RecipeModel):
    """The low-rank correction of ``prunekit prune`` (``lowrank`` in a recipe; off at budget 0)."""

    budget: float = Field(0.0, ge=0, lt=1, description="extra parameters, as a fraction of the targeted layers' "
                                                         "parameters; 0 = no correction")
    allocation: Literal["global", "uniform"] = Field("uniform", description="uniform: every layer the same share "
                                                                            "of its own parameters; global: by "
                                                                            "marginal error reduction across layers "
                                                                            "(with iterations 0)")
    layer_cap: float = Field(0.3, gt=0, lt=1, description="most extra parameters one layer may get, as a "
                                                           "fraction of its own")
    dampening: float = Field(0.01, gt=0, lt=1, description="fraction of the mean input second moment added to "
                                                            "its diagonal before whitening")
    iterations: int = Field(4, ge=0, description="rounds of re-pruning W − L R and refitting L R to W − S per "
                                                 "layer, at the layer's share of the budget; 0 = prune once "
                                                 "(kind armor: its alternating rounds, at least 1)")
    refit: bool = Field(False, description="correction only: in every round, refit the sparse part's kept values "
                                           "to W − L R by least squares on the calibration inputs (mask fixed)")
    kind: Literal["correction", "armor"] = Field("correction", description="correction: S + L·R (a rank-r term "
                                                                          "beside the sparse weight); armor: "
                                                                          "A·S·B, block-diagonal A and B "
                                                                          "(weights.armor)")
    reselect: int = Field(0, ge=0, description="armor only: re-choose the mask with the method every this many "
                                               "rounds, on the problem seen through A and B; 0 = keep the "
                                               "method's mask")
    stream: Literal["auto", "corrected", "sparse"] = Field("auto", description="what later layers are calibrated "
                                                                               "on: corrected (each layer with its "
                                                                               "correction; needs uniform ranks) or "
                                                                               "sparse layers; auto = corrected "
                                                                               "where the ranks allow it")

    @model_validator(mode="after")
    def _cap(self) -> "LowRankSettings":
        if self.kind == "armor" and self.enabled:
            if self.allocation != "uniform":
                raise PrunekitError("ARMOR's block sizes come from each layer's own share of the budget; "
                                    "use lowrank.allocation uniform")
            if self.iterations < 1:
                raise PrunekitError("ARMOR needs at least one alternating round; set lowrank.iterations 1 or more")
        if self.allocation == "global" and self.iterations:
            raise PrunekitError("global allocation chooses the ranks once every layer is pruned, but alternating needs "
                                "each layer's rank while it is pruned; set lowrank.iterations 0 or allocation uniform")
        if self.stream == "corrected" and self.allocation == "global":
            raise PrunekitError("global allocation chooses the ranks once every layer is pruned, so the stream "
                                "cannot run through the corrected layers; set lowrank.stream sparse (or auto)")
        if self.budget > self.layer_cap:
            raise PrunekitError(f"lowrank budget {self.budget} exceeds the per-layer cap {self.layer_cap}; "
                                "raise lowrank.layer_cap")
        return self

    @property
    def enabled(self) -> bool:
        return self.budget > 0

    @property
    def corrected_stream(self) -> bool:
        return self.stream == "corrected" or (self.stream == "auto" and self.allocation == "uniform")


class HeldWeights:
    """Layers that carry their corrected weight as one dense tensor while their block is still being run, so
    the calibration stream sees the corrected model; ``restore`` gives each its sparse weight back (called when
    the block is done, before a streaming pipeline writes it)."""

    def __init__(self) -> None:
        self.held: list[tuple[torch.Tensor, torch.Tensor]] = []

    @torch.no_grad()
    def hold(self, weight: torch.Tensor, effective: torch.Tensor) -> None:
        self.held.append((weight, weight.detach().clone()))
        weight.copy_(effective.to(weight.dtype))

    @torch.no_grad()
    def restore(self) -> None:
        for weight, sparse in self.held:
            weight.copy_(sparse)
        self.held.clear()


@dataclass
class LayerFit:
    name: str
    shape: tuple[int, int]
    svd: WhitenedSVD
    dense_energy: float  # ‖W X‖² / n, the dense output energy
    dtype: torch.dtype

    @property
    def parameters(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def rank_cost(self) -> int:
        return self.shape[0] + self.shape[1]


@dataclass
class LayerCorrection:
    name: str
    shape: tuple[int, int]
    rank: int
    error_before: float  # ‖(W − S) X‖² / n, undampened
    error_after: float  # ‖(W − S − L R) X‖² / n
    dense_energy: float

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "rank": self.rank,
                "extra_parameters": self.rank * (self.shape[0] + self.shape[1]),
                "relative_error_before": self.error_before / max(self.dense_energy, 1e-30),
                "relative_error_after": self.error_after / max(self.dense_energy, 1e-30)}


@dataclass
class CorrectionResult:
    settings: dict
    layers: list[LayerCorrection] = field(default_factory=list)
    target_parameters: int = 0

    @property
    def extra_parameters(self) -> int:
        return sum(layer.rank * (layer.shape[0] + layer.shape[1]) for layer in self.layers)

    def to_dict(self) -> dict:
        before = sum(layer.error_before / max(layer.dense_energy, 1e-30) for layer in self.layers)
        after = sum(layer.error_after / max(layer.dense_energy, 1e-30) for layer in self.layers)
        return {"settings": self.settings, "extra_parameters": self.extra_parameters,
                "extra_fraction": self.extra_parameters / max(self.target_parameters, 1),
                "layers_corrected": sum(1 for layer in self.layers if layer.rank > 0),
                "mean_relative_error_before": before / max(len(self.layers), 1),
                "mean_relative_error_after": after / max(len(self.layers), 1),
                "layers": [layer.to_dict() for layer in self.layers]}


def build_correction(settings: LowRankSettings) -> "LowRankCorrection | None":
    """The correction the settings ask for (``None`` at budget 0): this module's, or ARMOR's factorisation."""
    if not settings.enabled:
        return None
    if settings.kind == "armor":
        from prunekit.weights.armor import ArmorCorrection  # it builds on this module's records

        return ArmorCorrection(settings)
    return LowRankCorrection(settings)


class LowRankCorrection(HeldWeights):
    """Fits every pruned layer as it is pruned (``fit``), then chooses ranks and attaches them (``attach``)."""

    statistics: type[LayerStatistics] = InputHessian

    def __init__(self, settings: LowRankSettings):
        super().__init__()
        self.settings = settings
        self.fits: dict[str, LayerFit] = {}

    @torch.no_grad()
    def fit(self, target: Target, dense: torch.Tensor, stats: LayerStatistics | None,
            reprune: Callable[[torch.Tensor], object] | None = None) -> None:
        """Fit the pruned ``target`` (its weight now sparse) against its ``dense`` weight.

        With ``iterations`` and ``reprune`` (the method pruning a weight in place, same ratio and pattern), the
        sparse part and a correction of the layer's share of the budget are first refined in turn: the sparse
        part re-pruned from ``W − L R``, the correction refitted to ``W − S``; the pair with the least error is
        kept (so never worse than the first pruning), and its sparse part replaces the layer's weight."""
        if not isinstance(stats, InputHessian):
            raise PrunekitError(f"the low-rank correction of {target.name} needs its calibration inputs")
        if target.transposed or target.expert is not None or type(target.module) is not nn.Linear:
            raise PrunekitError(f"{target.name} is not an nn.Linear; the low-rank correction takes linear layers only")
        sparse = target.weight.detach().to(torch.float64)
        dense = dense.detach().to(torch.float64)
        whitening = whitening_factor(stats.gram_matrix().to(torch.float64).div_(max(stats.rows, 1)),
                                     self.settings.dampening)
        out_features, in_features = sparse.shape
        share = rank_for_fraction(out_features, in_features, self.settings.budget)
        # Uniform ranks are known now: keep only the factors that can be used.
        cap = share if self.settings.allocation == "uniform" else rank_for_fraction(out_features, in_features,
                                                                                      self.settings.layer_cap)
        if self.settings.iterations and reprune is not None and share:
            sparse = self._alternate(target, dense, sparse, whitening, share, reprune)
        fit = LayerFit(target.name, (out_features, in_features), whitened_svd(dense - sparse, whitening, cap),
                       output_energy(dense, whitening), target.weight.dtype)
        self.fits[target.name] = fit
        if self.settings.corrected_stream:
            rank = self._rank(fit, share)
            if rank:
                left, right = fit.svd.factors(rank, torch.float64)
                self.hold(target.weight, sparse + left @ right)

    @staticmethod
    def _rank(fit: LayerFit, allocated: int) -> int:
        """The rank, up to ``allocated``, with the least undampened error (0: the correction would not help)."""
        return int(torch.argmin(fit.svd.errors[:allocated + 1]))

    def _alternate(self, target: Target, dense: torch.Tensor, sparse: torch.Tensor, whitening: Whitening, rank: int,
                   reprune: Callable[[torch.Tensor], object]) -> torch.Tensor:
        best_error = float(whitened_svd(dense - sparse, whitening, rank).errors[rank])
        best, current = sparse, sparse
        # The method's kept values are not the least-squares fit of its own mask (SparseGPT updates only the
        # columns after each one it prunes): refitting them removes a large share of a layer's error.
        hessian = whitening.factor @ whitening.factor.T if self.settings.refit else None
        for _ in range(self.settings.iterations):
            left, right = whitened_svd(dense - current, whitening, rank).factors(rank, torch.float64)
            candidate = (dense - left @ right).to(target.weight.dtype)
            reprune(candidate)
            current = candidate.to(torch.float64)
            if hessian is not None:
                current = refit_kept_values(dense - left @ right, current, hessian)
            error = float(whitened_svd(dense - current, whitening, rank).errors[rank])
            if error < best_error:
                best, best_error = current, error
        if best is not sparse:
            target.weight.copy_(best)
        return best

    def ranks(self, budget: float | None = None) -> dict[str, int]:
        """Each fitted layer's rank under ``budget`` (the settings' by default)."""
        budget = self.settings.budget if budget is None else budget
        fits = list(self.fits.values())
        if self.settings.allocation == "uniform":
            return {fit.name: min(rank_for_fraction(*fit.shape, budget), fit.svd.singular.numel()) for fit in fits}
        remaining = budget * sum(fit.parameters for fit in fits)
        ranks = {fit.name: 0 for fit in fits}
        gains = {fit.name: (fit.svd.gains() / max(fit.dense_energy, 1e-30) / fit.rank_cost).tolist() for fit in fits}
        costs = {fit.name: fit.rank_cost for fit in fits}
        heap = [(-gains[fit.name][0], fit.name) for fit in fits if gains[fit.name]]
        heapq.heapify(heap)
        while heap:
            _, name = heapq.heappop(heap)
            if costs[name] > remaining:
                continue  # this layer's further ranks cost the same: none of them fits either
            remaining -= costs[name]
            ranks[name] += 1
            if ranks[name] < len(gains[name]):
                heapq.heappush(heap, (-gains[name][ranks[name]], name))
        return ranks

    @torch.no_grad()
    def attach(self, model: nn.Module, budget: float | None = None) -> CorrectionResult:
        """Put the chosen corrections into ``model`` (whose layers hold the sparse weights the fits saw; a copy of
        the pruned model will do, so several budgets can be tried on one pruning run).

        A layer gets the rank, up to its allocated one, with the least undampened error: never more error
        than without a correction."""
        self.restore()
        settings = self.settings.model_dump(mode="json")
        if budget is not None:
            if self.settings.corrected_stream and budget != self.settings.budget:
                raise PrunekitError("the calibration stream ran through the corrected layers at the settings' "
                                    "budget; prune with lowrank.stream sparse to try other budgets on one run")
            settings["budget"] = budget
        result = CorrectionResult(settings, target_parameters=sum(fit.parameters for fit in self.fits.values()))
        for name, allocated in self.ranks(budget).items():
            fit = self.fits[name]
            errors = fit.svd.errors
            rank = self._rank(fit, allocated)
            if rank:
                left, right = fit.svd.factors(rank, fit.dtype)
                attach_correction(model, name, left, right)  # a linear target's name is its module's path
            result.layers.append(LayerCorrection(name, fit.shape, rank, float(errors[0]), float(errors[rank]),
                                                 fit.dense_energy))
        return result
