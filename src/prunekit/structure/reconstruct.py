"""Least-squares reconstruction of the layers that read removed channels.

Removing input channels from a consumer ``W`` (an ``nn.Linear``: ``down_proj`` for MLP neurons,
``o_proj`` for heads) throws away their contribution ``W_R X_R``. The kept columns can absorb
most of it: with the calibration Gram matrix ``G = X Xᵀ`` of the consumer's inputs, the columns
``W'_K`` that minimise ``‖W X − W'_K X_K‖² + λ ‖W'_K − W_K‖²`` are

    W'_K = (W G[:, K] + λ W_K) (G[K, K] + λ I)⁻¹

(the normal equations of a ridge towards the unpruned columns; ``λ`` = ``damping`` × the mean
diagonal of ``G[K, K]``). The ridge pulls towards the layer's own weights rather than towards zero
because a Gram matrix from little calibration data has low rank: on SmolLM2 with 8 × 192
calibration tokens and FLAP's selection, a refit damped towards zero (0.01) raised perplexity from 59
(FLAP's own compensation) to 121; this ridge gives 60 at 0.1 and 54 at 0.5. With 32 × 512 tokens it
gives 48 at both (FLAP: 55), and on the 20 % benchmark 38.81 at the default 0.1, 39.74 at 0.5,
against 41.47 damped towards zero (docs/structure.md). This is the structured counterpart of
SparseGPT's weight update and subsumes FLAP's bias compensation, which moves only the mean of the removed inputs. The removed columns are set to
zero, so the model keeps its shapes until ``shrink`` slices them away.

Language models are reconstructed block by block (``run_sequential``'s layer order): each consumer
is refitted on the inputs produced by the already-reconstructed layers before it, and the target
is its own original output on those inputs. Other models get one dense pass with forward hooks.
Convolutions, the output head, tied tables and families read through a normalisation statistic
(hidden width) are left as they are: the caller is told which.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from prunekit.core.calibration import Target, run_sequential
from prunekit.core.statistics import InputHessian, LayerStatistics
from prunekit.errors import PrunekitError
from prunekit.models.base import ModelAdapter
from prunekit.structure.graph import DependencyGraph
from prunekit.structure.shrink import check_removal, compensation_targets, removed_by_dimension
from prunekit.structure.statistics import block_of_modules, feed_batches

DEFAULT_DAMPING = 0.1


def refit_columns(weight: torch.Tensor, gram: torch.Tensor, removed: torch.Tensor,
                  damping: float = DEFAULT_DAMPING) -> torch.Tensor:
    """``weight`` (out, in) with its ``removed`` input columns zeroed and the others refitted to
    reproduce ``weight @ x`` for inputs whose Gram matrix is ``gram`` (in, in). Returns a new tensor."""
    columns = weight.shape[1]
    keep_mask = torch.ones(columns, dtype=torch.bool)
    keep_mask[removed.cpu()] = False
    kept = keep_mask.nonzero().squeeze(1)
    g = gram.double().cpu()
    w = weight.detach().double().cpu()
    rows = g.index_select(0, kept)  # G[K, :]
    g_kk = rows.index_select(1, kept)
    dead = g_kk.diagonal() == 0  # channels never active in calibration: keep their weights, fit nothing to them
    mean_diagonal = g_kk.diagonal().mean().clamp_min(1e-12)
    g_kk.diagonal().add_(damping * mean_diagonal)
    g_kk.diagonal()[dead] = 1.0
    right = rows @ w.T  # G[K, :] Wᵀ  (kept, out)
    right += damping * mean_diagonal * w.index_select(1, kept).T  # the ridge towards W_K (module docstring)
    factor, info = torch.linalg.cholesky_ex(g_kk)
    if int(info) != 0:
        raise PrunekitError("the calibration Gram matrix is not positive definite even with damping; "
                            "raise the reconstruction damping or use more calibration data")
    refitted = torch.cholesky_solve(right, factor).T  # (out, kept)
    refitted[:, dead] = w.index_select(1, kept)[:, dead]
    result = torch.zeros_like(w)
    result[:, kept] = refitted
    return result.to(dtype=weight.dtype, device=weight.device)


def reconstruction_targets(graph: DependencyGraph, removal: Mapping[str, Sequence[int]],
                           adapter: ModelAdapter | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(module name -> removed input columns) of every Linear consumer that can be refitted, and the
    modules reading removed channels that cannot (convolutions, output heads, tied tables, inputs
    normalised over the removed channels)."""
    checked = check_removal(graph, removal)
    merged = removed_by_dimension(graph, checked)
    inexact = {m.tensor for name in checked for m in graph.family(name).members if not graph.family(name).exact}
    consumers = {tensor for (tensor, dim) in merged if dim == graph.input_dims.get(tensor, 1)}
    owners = compensation_targets(graph, consumers, adapter)
    modules = {call.weight: call.module for call in graph.calls if call.kind in ("linear", "conv")}
    targets, skipped = {}, []
    for tensor in sorted(consumers):
        name = owners.get(tensor)
        module = graph.model.get_submodule(name) if name is not None else None
        if name is None or not isinstance(module, nn.Linear) or tensor in inexact:
            skipped.append(modules.get(tensor, tensor) or "<root>")
            continue
        targets[name] = merged[(tensor, graph.input_dims.get(tensor, 1))]
    return targets, sorted(set(skipped))


class _Refit:
    """``run_sequential`` processor: Gram of each target's inputs, then the refit in place."""

    def __init__(self, removed: Mapping[str, torch.Tensor], damping: float):
        self.removed = removed
        self.damping = damping

    def statistics(self, target: Target) -> type[LayerStatistics]:
        return InputHessian

    def process(self, target: Target, stats: LayerStatistics | None) -> None:
        assert isinstance(stats, InputHessian)
        weight = target.module.weight
        with torch.no_grad():
            weight.copy_(refit_columns(weight, stats.gram_matrix(), self.removed[target.name], self.damping))


def reconstruct(model: nn.Module, graph: DependencyGraph, removal: Mapping[str, Sequence[int]], batches: Sequence,
                adapter: ModelAdapter | None = None, windows: torch.Tensor | None = None, batch_size: int = 4,
                damping: float = DEFAULT_DAMPING) -> tuple[list[str], list[str]]:
    """Refit, in place, the Linear layers that read the channels ``removal`` will remove; returns
    (refitted modules, modules left as they are). Run it before ``shrink``, on the same graph."""
    removed, skipped = reconstruction_targets(graph, removal, adapter)
    if not removed:
        return [], skipped
    if windows is not None and adapter is not None:
        block_of = block_of_modules(adapter)
        targets = []
        for name in removed:
            if name not in block_of:
                skipped.append(name)
                continue
            targets.append(Target(name, model.get_submodule(name), block_of[name]))
        removed = {t.name: removed[t.name] for t in targets}
        run_sequential(model, adapter, windows, targets, _Refit(removed, damping), mode="layer", batch_size=batch_size,
                       description="Reconstructing")
        return sorted(removed), sorted(set(skipped))
    grams = {name: InputHessian(model.get_submodule(name).in_features) for name in removed}
    feed_batches(model, batches, {model.get_submodule(name): (lambda _m, args, g=gram: g.add(args[0]))
                                  for name, gram in grams.items()})
    processor = _Refit(removed, damping)
    for name, gram in grams.items():
        processor.process(Target(name, model.get_submodule(name), None), gram)
    return sorted(removed), skipped


__all__ = ["DEFAULT_DAMPING", "reconstruct", "reconstruction_targets", "refit_columns"]
