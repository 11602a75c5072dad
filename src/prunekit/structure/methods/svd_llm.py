"""SVD-LLM (Wang et al., 2024): every linear of the blocks replaced by two thin ones, truncated in the whitened basis.

With ``X`` a layer's calibration inputs and ``C`` the Cholesky factor of ``X Xᵀ / n`` (dampened), the SVD of ``W C``
truncated to rank r and mapped back by ``C⁻¹`` is the rank-r matrix with the least output error ``‖(W − L R) X‖``
(truncation-aware data whitening: each discarded singular value is exactly the error it causes, which a plain
SVD of ``W`` does not promise). The layer becomes ``lowrank_out(lowrank_in(x))`` (``core.lowrank.FactoredLinear``),
``r (in + out)`` parameters instead of ``in · out``.

Layers are visited block by block through the calibration stream (``sequential``): in ``layer`` order each layer
is fitted on the inputs the already factored layers produce, so later layers absorb part of earlier errors;
``dense`` fits every layer on the unpruned model's activations, as the paper's whitening does.

``update`` refits the second factor in closed form once the first is fixed: ``L = argmin ‖W X_d − L R X‖``, i.e.
``L = W (X X_dᵀ)ᵀ Rᵀ (R X Xᵀ Rᵀ)⁻¹``, where ``X`` are the inputs the already factored layers give the layer and
``X_d`` the dense model's (in ``layer`` order a dense twin of the calibration stream carries them,
``core.statistics.TwinInputHessian``; in ``dense`` order they are the same). Later layers then undo part of what
earlier truncations changed, and in either order the refit is the exact least-squares ``L`` for the ``R`` kept
(SVD-LLM's whitened truncation is optimal only in the dampened norm).

The rank is uniform in the sense of a parameter ratio: every targeted linear keeps the same fraction of its
parameters, the fraction chosen so that ``ratio`` of the whole model's parameters is removed (the embeddings and
norms are not factored, so the linears give up a little more than ``ratio`` of their own).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
from pydantic import Field
from torch import nn

from prunekit.core.calibration import SequentialCalibration, Target
from prunekit.core.lowrank import factor_linear, output_energy, rank_for_fraction, whitened_svd, whitening_factor
from prunekit.core.progress import progress_bar
from prunekit.core.statistics import InputHessian, LayerStatistics, TwinInputHessian
from prunekit.errors import PrunekitError
from prunekit.models.base import adapter_for
from prunekit.structure.shrink_method import SHRINK_METHODS, ShrinkMethod


@dataclass
class _Factored:
    name: str
    shape: tuple[int, int]
    rank: int
    left: torch.Tensor
    right: torch.Tensor
    relative_error: float  # ‖(W − L R) X‖² / ‖W X‖² on the inputs the layer was fitted on

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "rank": self.rank,
                "parameters_after": self.rank * sum(self.shape), "relative_error": self.relative_error}


class _Factorer:
    """A calibration processor: fits each target as its statistics complete, and makes the stream see the
    factored layer (its weight becomes ``L R``) so later layers are fitted on what the shrunk model computes."""

    def __init__(self, rank_of: Callable[[int, int], int], dampening: float, update: bool = False,
                 twin: bool = False, update_dampening: float = 0.1):
        self.rank_of, self.dampening, self.update, self.twin = rank_of, dampening, update, twin
        self.update_dampening = update_dampening
        self.done: list[tuple[Target, _Factored]] = []

    def statistics(self, target: Target) -> type[LayerStatistics]:
        return TwinInputHessian if self.twin else InputHessian

    @torch.no_grad()
    def process(self, target: Target, stats: LayerStatistics | None) -> None:
        assert isinstance(stats, InputHessian)
        weight = target.weight
        out_features, in_features = weight.shape
        rank = self.rank_of(out_features, in_features)
        whitening = whitening_factor(stats.gram_matrix().to(torch.float64).div_(max(stats.rows, 1)), self.dampening)
        svd = whitened_svd(weight, whitening, rank)
        left, right = svd.factors(rank, weight.dtype)
        error = float(svd.errors[rank]) / max(output_energy(weight, whitening), 1e-30)
        if self.update and rank:
            left, error = refit_second_factor(weight, right, stats, self.update_dampening)
        weight.copy_(left @ right)
        self.done.append((target, _Factored(target.name, (out_features, in_features), rank, left, right, error)))


@torch.no_grad()
def refit_second_factor(weight: torch.Tensor, right: torch.Tensor, stats: InputHessian,
                        dampening: float) -> tuple[torch.Tensor, float]:
    """The least-squares ``L`` of ``‖W X_d − L R X‖`` for a fixed ``R`` (``X_d = X`` without a twin stream), with
    ``X Xᵀ`` dampened by ``dampening`` × its mean diagonal as ``prune --asymmetric`` dampens its shift, and the
    relative error ``‖(W − L R) X‖² / ‖W X‖²`` of the result on the layer's own inputs (undampened)."""
    gram = stats.gram_matrix().to(torch.float64)
    dampened = gram.clone()
    dampened.diagonal().add_(dampening * float(gram.diagonal().mean().clamp_min(1e-30)))
    cross = dampened + stats.shift.to(torch.float64) if isinstance(stats, TwinInputHessian) else dampened
    weight64, right64 = weight.to(torch.float64), right.to(torch.float64)
    normal = right64 @ dampened @ right64.T
    left = torch.linalg.solve(normal, right64 @ cross.T @ weight64.T).T
    residual = weight64 - left @ right64
    energy = float(((weight64 @ gram) * weight64).sum())
    return left.to(weight.dtype), float(((residual @ gram) * residual).sum()) / max(energy, 1e-30)


@SHRINK_METHODS.register("svd-llm")
class SvdLLM(ShrinkMethod):
    dampening: float = Field(0.01, gt=0, lt=1, description="fraction of the mean input second moment added to its "
                                                            "diagonal before the Cholesky factorisation")
    sequential: Literal["layer", "dense"] = Field("layer", description="layer: each layer fitted on the inputs the "
                                                                       "already factored layers produce; dense: on "
                                                                       "the unpruned model's")
    update: bool = Field(False, description="refit each layer's second factor in closed form to the dense model's "
                                            "outputs from the inputs the factored layers give it (layer order: a "
                                            "dense twin of the calibration stream)")
    update_dampening: float = Field(0.1, gt=0, description="the update's dampening: fraction of the mean input "
                                                           "second moment added to its diagonal (as prune "
                                                           "--asymmetric's)")

    def apply(self, model: nn.Module, calibration: torch.Tensor, ratio: float, batch_size: int) -> dict[str, Any]:
        adapter = adapter_for(model)
        blocks = adapter.blocks()
        targets = {index: adapter.block_weights(index) for index in range(len(blocks))}
        flat = [t for found in targets.values() for t in found]
        odd = [t.name for t in flat if t.transposed or t.expert is not None or type(t.module) is not nn.Linear]
        if odd:
            raise PrunekitError(f"svd-llm factors nn.Linear layers; {odd[0]} is not one")
        model_parameters = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        linear_parameters = sum(t.weight.numel() for t in flat)
        layer_ratio = ratio * model_parameters / max(linear_parameters, 1)
        if layer_ratio >= 1:
            raise PrunekitError(f"removing {ratio:.0%} of the model's parameters would take {layer_ratio:.0%} of its "
                                "linear layers'; choose a smaller ratio")
        return self.factor(model, calibration, batch_size,
                           lambda out_features, in_features: max(1, rank_for_fraction(out_features, in_features,
                                                                                      1 - layer_ratio)),
                           extra={"ratio": ratio, "linear_ratio": layer_ratio})

    def factor(self, model: nn.Module, calibration: torch.Tensor, batch_size: int,
               rank_of: Callable[[int, int], int], extra: dict | None = None) -> dict[str, Any]:
        """Factor every linear of the blocks at ``rank_of(out, in)``; the model is changed in place."""
        adapter = adapter_for(model)
        blocks = adapter.blocks()
        twin = self.update and self.sequential == "layer"
        factorer = _Factorer(rank_of, self.dampening, self.update, twin, self.update_dampening)
        steps = SequentialCalibration(adapter, factorer, "layer" if self.sequential == "layer" else "dense",
                                      twin=twin)
        steps.capture(model, calibration, batch_size)
        with progress_bar("Factoring (svd-llm)", len(blocks)) as bar:
            for index, block in enumerate(blocks):
                # In dense order the block's outputs are computed before its layers change (SequentialCalibration).
                steps.run_block(index, block, adapter.block_weights(index))
                bar.advance()
        steps.inputs = None
        paths = {id(module): path for path, module in model.named_modules()}
        layers = []
        for target, factored in factorer.done:
            factor_linear(model, paths[id(target.module)], factored.left, factored.right)
            layers.append(factored.to_dict())
        before = sum(layer["shape"][0] * layer["shape"][1] for layer in layers)
        after = sum(layer["parameters_after"] for layer in layers)
        return {"method": self.settings(), **(extra or {}), "linear_parameters_before": before,
                "linear_parameters_after": after,
                "mean_relative_error": sum(layer["relative_error"] for layer in layers) / max(len(layers), 1),
                "layers": layers}
