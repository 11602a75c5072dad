"""ARMOR-style factorisation: each pruned linear becomes ``A · S · B``, ``S`` N:M sparse between two block-diagonal
factors that are fitted to the layer's output on the calibration stream.

For a layer with dense weight ``W``, calibration inputs ``X`` and ``H = X Xᵀ / n``, the factors minimise
``‖(W − A S B) X‖²_F / n = tr((W − A S B) H (W − A S B)ᵀ)``, ``A`` (out × out) and ``B`` (in × in)
block-diagonal with ``b × b`` blocks, ``S`` keeping the pattern's mask. They start at ``A = B = I`` and ``S``
the one-shot method's result, then alternate, each round (``iterations``):

- ``A``: exact. The objective splits over ``A``'s blocks: with ``M = S B``, block ``i`` is
  ``(W_i H M_iᵀ)(M_i H M_iᵀ)⁻¹`` (``W_i``, ``M_i`` the block's rows).
- ``B``: the normal equations ``blockdiag(Nᵀ N B H) = blockdiag(Nᵀ W H)`` (``N = A S``) couple the blocks
  through ``H``; preconditioned conjugate gradients on them, the preconditioner each block's own
  ``(NᵀN)_jj⁻¹ · H_jj⁻¹`` (the exact solution when ``H`` is block-diagonal).
- the mask (every ``reselect`` rounds): the one-shot method is run again on the problem seen through the
  factors, ``W' = A⁻¹ W B⁻¹`` with inputs ``B X`` (``H' = B H Bᵀ``), which is the layer's own problem exactly
  when ``A`` is orthogonal; otherwise an approximation the next steps correct (and the best round is kept).
- ``S``'s kept values: conjugate gradients on ``mask ⊙ (AᵀA S H') = mask ⊙ (Aᵀ W H Bᵀ)``, preconditioned by
  the inverse of the unmasked operator.

The fit runs in the dampened norm (``H + δ I``, as SparseGPT and the low-rank correction do); each round's
error is measured in the undampened one and the best round kept, the start (the method's ``S`` alone)
included, so a layer never ends with more error than pruning alone (a layer whose best is the start keeps
its plain sparse form). The block size follows from the budget: the largest divisor ``b`` of both dimensions
with ``b · (out + in) ≤ budget · out · in`` (two factors of ``out/b`` and ``in/b`` blocks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from prunekit.core.calibration import Target
from prunekit.core.lowrank import attach_armor, block_diagonal_apply, conjugate_gradients
from prunekit.core.statistics import InputHessian, LayerStatistics
from prunekit.errors import PrunekitError
from prunekit.weights.lowrank import CorrectionResult, HeldWeights, LayerCorrection, LowRankSettings

# Conjugate-gradient steps per round (warm-started, so rounds add up). On SmolLM2 layers the refit of S's kept
# values carries most of the gain (SparseGPT's sweep only updates later columns, so its values are not the least
# squares fit of its own mask) and converges in 8-16 steps; B's system in fewer.
SPARSE_STEPS = 8
INNER_STEPS = 4


def armor_block_size(out_features: int, in_features: int, fraction: float) -> int:
    """The largest block size dividing both dimensions whose two factors hold at most ``fraction`` of the
    layer's parameters; 0 if none does."""
    common = math.gcd(out_features, in_features)
    limit = fraction * out_features * in_features / (out_features + in_features)
    return max((b for b in range(1, common + 1) if common % b == 0 and b <= limit), default=0)


def _right(matrix: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``matrix @ D`` for ``D`` block-diagonal."""
    return block_diagonal_apply(blocks.transpose(1, 2), matrix)


def _left(blocks: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """``D @ matrix`` for ``D`` block-diagonal: one batched product over the row blocks."""
    count, size, _ = blocks.shape
    return torch.bmm(blocks, matrix.reshape(count, size, -1)).reshape(matrix.shape)


def _diagonal_blocks(left: torch.Tensor, right: torch.Tensor, size: int) -> torch.Tensor:
    """The ``size × size`` diagonal blocks of ``left @ right`` without the rest of the product."""
    count = left.shape[0] // size
    return torch.bmm(left.reshape(count, size, -1), right.reshape(-1, count, size).transpose(0, 1))


def _own_blocks(matrix: torch.Tensor, size: int) -> torch.Tensor:
    """The ``size × size`` diagonal blocks of a square matrix (a copy)."""
    count = matrix.shape[0] // size
    return matrix.reshape(count, size, count, size).diagonal(dim1=0, dim2=2).permute(2, 0, 1).contiguous()


def _ridge(blocks: torch.Tensor, fraction: float = 1e-6) -> torch.Tensor:
    """The blocks with a small multiple of their mean diagonal added (floored), so that dead features or an
    all-zero block still leave them invertible."""
    diagonal = blocks.diagonal(dim1=1, dim2=2)
    scale = diagonal.mean(dim=1, keepdim=True).clamp_min(1e-12) * fraction
    out = blocks.clone()
    out.diagonal(dim1=1, dim2=2).add_(scale)
    return out


@dataclass
class ArmorFit:
    """The best factors found for one layer and its errors (undampened ``tr(E H Eᵀ)``)."""

    outer: torch.Tensor  # A's blocks, (out / b) × b × b
    sparse: torch.Tensor  # S, out × in, the pattern's mask
    inner: torch.Tensor  # B's blocks, (in / b) × b × b
    error_start: float  # the one-shot method's S alone
    error: float  # the kept round's
    rounds: list[float]  # every round's error, in order

    @property
    def improved(self) -> bool:
        return self.error < self.error_start


class ArmorProblem:
    """One layer's ``min ‖(W − A S B) X‖`` with its statistics; the steps above as methods."""

    def __init__(self, dense: torch.Tensor, second_moment: torch.Tensor, dampening: float, block: int):
        self.block = block
        self.dense64 = dense.to(torch.float64)
        self.hessian64 = second_moment.to(torch.float64)
        self.dense = dense.to(torch.float32)
        self.damped = second_moment.to(torch.float32).clone()
        diagonal = self.damped.diagonal()
        diagonal.add_(dampening * float(diagonal.mean().clamp_min(1e-12)))
        self.dense_damped = self.dense @ self.damped  # W (H + δI), used by every step

    def product(self, outer: torch.Tensor, sparse: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
        return _left(outer, _right(sparse, inner))

    def error(self, outer: torch.Tensor, sparse: torch.Tensor, inner: torch.Tensor) -> float:
        difference = self.dense64 - self.product(outer.double(), sparse.double(), inner.double())
        return float(((difference @ self.hessian64) * difference).sum())

    def fit_outer(self, sparse: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
        mixed = _right(sparse, inner)  # M = S B
        projected = mixed @ self.damped  # M H
        numerator = _diagonal_blocks(self.dense, projected.T, self.block)  # W_i H M_iᵀ
        gram = _ridge(_diagonal_blocks(mixed, projected.T, self.block))  # M_i H M_iᵀ
        return torch.linalg.solve(gram, numerator.transpose(1, 2)).transpose(1, 2)

    def fit_inner(self, outer: torch.Tensor, sparse: torch.Tensor, inner: torch.Tensor, steps: int) -> torch.Tensor:
        size = self.block
        mapped = _left(outer, sparse)  # N = A S
        gram = mapped.T @ mapped  # Nᵀ N
        rhs = _diagonal_blocks(mapped.T, self.dense_damped, size)  # blockdiag(Nᵀ W H)
        gram_inverse = torch.linalg.inv(_ridge(_own_blocks(gram, size)))
        hessian_inverse = torch.linalg.inv(_ridge(_own_blocks(self.damped, size)))

        def operator(blocks: torch.Tensor) -> torch.Tensor:
            return _diagonal_blocks(_right(gram, blocks), self.damped, size)

        def precondition(residual: torch.Tensor) -> torch.Tensor:
            return gram_inverse @ residual @ hessian_inverse

        return conjugate_gradients(operator, rhs, inner, precondition, steps)

    def fit_sparse(self, outer: torch.Tensor, sparse: torch.Tensor, inner: torch.Tensor, steps: int) -> torch.Tensor:
        keep = (sparse != 0).to(sparse.dtype)
        seen = _left(inner, _right(self.damped, inner.transpose(1, 2)))  # H' = B H Bᵀ
        metric = outer.transpose(1, 2) @ outer  # AᵀA, block by block
        rhs = _left(outer.transpose(1, 2), _right(self.dense_damped, inner.transpose(1, 2))) * keep
        seen_inverse = torch.cholesky_inverse(torch.linalg.cholesky(_ridge(seen.unsqueeze(0))[0]))
        metric_inverse = torch.linalg.inv(_ridge(metric))

        def operator(values: torch.Tensor) -> torch.Tensor:
            return _left(metric, values @ seen) * keep

        def precondition(residual: torch.Tensor) -> torch.Tensor:
            return _left(metric_inverse, residual @ seen_inverse) * keep

        return conjugate_gradients(operator, rhs, sparse, precondition, steps)

    def transformed(self, outer: torch.Tensor, inner: torch.Tensor,
                    gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``A⁻¹ W B⁻¹`` and the raw ``B X Xᵀ Bᵀ``: the layer's problem as the sparse part sees it."""
        inner_inverse = torch.linalg.inv(_ridge(inner, 1e-9))
        target = _left(torch.linalg.inv(_ridge(outer, 1e-9)), _right(self.dense, inner_inverse))
        return target, _left(inner, _right(gram, inner.transpose(1, 2)))


def fit_armor(dense: torch.Tensor, sparse: torch.Tensor, stats: InputHessian, block: int, rounds: int,
              dampening: float, reselect: int = 0,
              reprune: Callable[[torch.Tensor, LayerStatistics], object] | None = None,
              steps: tuple[int, int] = (SPARSE_STEPS, INNER_STEPS)) -> ArmorFit:
    """Alternate ``rounds`` times from ``A = B = I`` and the method's ``sparse``; the best round is returned.

    ``reprune(weight, stats)`` prunes ``weight`` in place with the method, from the given statistics; with
    ``reselect`` it re-chooses the mask every ``reselect`` rounds. ``steps``: conjugate-gradient steps for S and
    for B in each round."""
    gram = stats.gram_matrix().to(torch.float32)
    problem = ArmorProblem(dense, gram / max(stats.rows, 1), dampening, block)
    out_features, in_features = dense.shape
    eye = torch.eye(block)
    outer = eye.repeat(out_features // block, 1, 1)
    inner = eye.repeat(in_features // block, 1, 1)
    current = sparse.to(torch.float32).clone()
    start = problem.error(outer, current, inner)
    best = (outer, current, inner, start)
    history = []
    for round_index in range(1, rounds + 1):
        if reselect and reprune is not None and round_index > 1 and (round_index - 1) % reselect == 0:
            target, seen = problem.transformed(outer, inner, gram)
            transformed = InputHessian(in_features)
            transformed.upper_only, transformed.gram, transformed.rows = False, seen, stats.rows
            transformed.squared_sum = seen.diagonal().double().clamp_min(0)
            reprune(target, transformed)
            current = target
        outer = problem.fit_outer(current, inner)
        inner = problem.fit_inner(outer, current, inner, steps[1])
        outer = problem.fit_outer(current, inner)
        current = problem.fit_sparse(outer, current, inner, steps[0])
        error = problem.error(outer, current, inner)
        history.append(error)
        if not math.isfinite(error):
            break
        if error < best[3]:
            best = (outer, current, inner, error)
    outer, current, inner, error = best
    return ArmorFit(outer, current, inner, start, error, history)


class ArmorCorrection(HeldWeights):
    """The ARMOR counterpart of ``weights.lowrank.LowRankCorrection``: ``fit`` each pruned layer as it is pruned,
    ``attach`` the factors at the end; the calibration stream runs through ``A S B`` (or, with ``stream sparse``,
    through the plain sparse layers)."""

    statistics: type[LayerStatistics] = InputHessian

    def __init__(self, settings: LowRankSettings):
        super().__init__()
        self.settings = settings
        self.fits: dict[str, tuple[ArmorFit, float, torch.dtype]] = {}

    @torch.no_grad()
    def fit(self, target: Target, dense: torch.Tensor, stats: LayerStatistics | None,
            reprune: Callable[..., object] | None = None) -> None:
        if not isinstance(stats, InputHessian):
            raise PrunekitError(f"ARMOR on {target.name} needs its calibration inputs")
        if target.transposed or target.expert is not None or type(target.module) is not nn.Linear:
            raise PrunekitError(f"{target.name} is not an nn.Linear; ARMOR takes linear layers only")
        out_features, in_features = target.weight.shape
        block = armor_block_size(out_features, in_features, self.settings.budget)
        dense = dense.detach().to(torch.float32)
        # A layer too small for any block under the budget is only measured (no rounds): it stays as pruned.
        fit = fit_armor(dense, target.weight.detach(), stats, block or 1, self.settings.iterations if block else 0,
                        self.settings.dampening, self.settings.reselect, reprune)
        self.fits[target.name] = (fit, self._energy(dense, stats), target.weight.dtype)
        if fit.improved and self.settings.corrected_stream:
            self.hold(target.weight, _left(fit.outer, _right(fit.sparse, fit.inner)))

    @staticmethod
    def _energy(dense: torch.Tensor, stats: InputHessian) -> float:
        weight = dense.double()
        return float(((weight @ stats.gram_matrix().double()) * weight).sum()) / max(stats.rows, 1)

    @torch.no_grad()
    def attach(self, model: nn.Module, budget: float | None = None) -> CorrectionResult:
        """Put every layer's best factors into ``model`` (whose layers hold the one-shot method's weights); a
        layer whose best is its sparse weight alone stays a plain linear."""
        if budget is not None and budget != self.settings.budget:
            raise PrunekitError("ARMOR's block sizes are fixed while the layers are pruned; refit for another budget")
        self.restore()
        result = CorrectionResult(self.settings.model_dump(mode="json"))
        for name, (fit, energy, dtype) in self.fits.items():
            module = model.get_submodule(name)
            shape = (module.out_features, module.in_features)
            result.target_parameters += shape[0] * shape[1]
            block = 0
            if fit.improved:
                block = fit.inner.shape[-1]
                attach_armor(model, name, fit.outer.to(dtype), fit.sparse.to(dtype), fit.inner.to(dtype))
            result.layers.append(ArmorLayer(name, shape, block, fit.error_start, fit.error, energy))
        return result


@dataclass
class ArmorLayer(LayerCorrection):
    """A layer's record: ``rank`` holds its block size (0: left as the method pruned it), which costs the same
    ``block · (out + in)`` extra parameters as a rank would."""

    def to_dict(self) -> dict:
        record = super().to_dict()
        record["block"] = record.pop("rank")
        return record
