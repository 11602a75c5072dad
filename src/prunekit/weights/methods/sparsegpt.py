"""SparseGPT (Frantar & Alistarh, 2023): prune with the OBS update of the remaining weights.

Columns are visited left to right in blocks. Within a block the mask is chosen by the OBS
saliency w² / [H⁻¹]²_jj (for N:M, every M columns), each pruned weight's error is spread over
the not-yet-visited columns of its row through the Cholesky factor of H⁻¹, and the block's
accumulated error is applied to all later columns at once (lazy batch updates).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from pydantic import Field

from prunekit.core.patterns import SparsityPattern
from prunekit.core.statistics import InputHessian, LayerStatistics, match_blas_threads
from prunekit.errors import PrunekitError
from prunekit.weights.base import METHODS, OneShotMethod

try:  # in-place factorisations: torch's allocate a second d×d matrix
    from scipy.linalg import lapack as _lapack
except ImportError:  # pragma: no cover - scipy comes with gensim
    _lapack = None


_NOT_DEFINITE = ("SparseGPT: the calibration Hessian is not positive definite even with 1000× dampening; "
                 "use more calibration samples")


def _inverse_upper_in_place(hessian: torch.Tensor) -> bool:
    """Overwrite the upper triangle of the (symmetric, C-ordered) ``hessian`` with the upper
    Cholesky factor of its inverse; False if it is not positive definite. LAPACK sees the memory
    as the Fortran-ordered transpose, whose lower triangle is this upper one."""
    match_blas_threads()
    fortran = hessian.numpy().T
    factor, info = _lapack.spotrf(fortran, lower=1, overwrite_a=1, clean=0)
    if info != 0:
        return False
    inverse, info = _lapack.spotri(factor, lower=1, overwrite_c=1)
    if info != 0:
        return False
    upper, info = _lapack.spotrf(inverse, lower=1, overwrite_a=1, clean=0)
    if info != 0:
        return False
    if not np.shares_memory(upper, fortran):
        # A wrapper that copied: bring back the upper triangle row by row, which keeps the lower one
        # (the lent raw sums) and makes no second full matrix.
        for row in range(hessian.shape[0]):
            hessian[row, row:] = torch.from_numpy(upper[row:, row])
    return True


def _drop_lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    keep = torch.ones_like(scores, dtype=torch.bool)
    if count > 0:
        keep.view(-1)[torch.topk(scores.reshape(-1), count, largest=False, sorted=False).indices] = False
    return keep


@METHODS.register("sparsegpt")
class SparseGPT(OneShotMethod):
    statistics: ClassVar[type[LayerStatistics]] = InputHessian
    updates_kept_weights: ClassVar[bool] = True

    dampening: float = Field(0.01, gt=0, lt=1, description="fraction of the mean Hessian diagonal added to it")
    block_size: int = Field(128, ge=1, description="columns pruned together before the lazy update")

    def scores(self, weight: torch.Tensor, stats: LayerStatistics | None) -> torch.Tensor:
        assert isinstance(stats, InputHessian)
        inverse_diag = torch.cholesky_inverse(self._cholesky(stats.hessian())).diagonal()
        return weight.square() / inverse_diag.unsqueeze(0).square()

    def _inverse_upper_factor(self, stats: InputHessian, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Upper Cholesky factor of H⁻¹ and the mask of dead inputs, through torch: two d×d buffers
        beside the accumulator while the first factorisation runs."""
        hessian = stats.hessian().to(device)
        dead = hessian.diagonal() == 0
        factor = self._cholesky(hessian)
        del hessian
        torch.cholesky_inverse(factor, out=factor)
        torch.linalg.cholesky(factor, upper=True, out=factor)
        return factor, dead

    def _dampen(self, hessian: torch.Tensor, attempt: int, applied: torch.Tensor | float = 0.0) -> torch.Tensor:
        """Set dead inputs' diagonal to 1 and bring the added dampening to ``dampening × 10^attempt``
        of the mean diagonal; ``applied`` is what an earlier attempt already added to this matrix."""
        diagonal = hessian.diagonal()
        diagonal[diagonal == 0] = 1.0
        wanted = self.dampening * (diagonal.mean() - applied) * 10**attempt
        diagonal.add_(wanted - applied)
        return wanted

    def _cholesky(self, hessian: torch.Tensor) -> torch.Tensor:
        """Lower Cholesky factor of the dampened Hessian; modifies ``hessian`` (a private copy)."""
        applied: torch.Tensor | float = 0.0
        for attempt in range(4):
            applied = self._dampen(hessian, attempt, applied)
            factor, info = torch.linalg.cholesky_ex(hessian)
            if int(info) == 0:
                return factor
        raise PrunekitError(_NOT_DEFINITE)

    @torch.no_grad()
    def prune(self, weight: torch.Tensor, stats: LayerStatistics | None, sparsity: float,
              pattern: SparsityPattern) -> torch.Tensor:
        """On the CPU the factorisations run in place, in the statistics' own accumulator (lent and
        restored by ``InputHessian.lent_hessian``): an 8640-wide layer then needs no 300 MB Hessian
        copy beside it. A Hessian that needs more than the base dampening takes the torch path."""
        assert isinstance(stats, InputHessian)
        if weight.device.type == "cpu" and stats.upper_only and _lapack is not None:
            with stats.lent_hessian() as hessian:
                dead = hessian.diagonal() == 0
                self._dampen(hessian, 0)
                if _inverse_upper_in_place(hessian):
                    return self._sweep(weight, hessian, dead, sparsity, pattern)
        return self._sweep(weight, *self._inverse_upper_factor(stats, weight.device), sparsity, pattern)

    def _sweep(self, weight: torch.Tensor, upper: torch.Tensor, dead: torch.Tensor, sparsity: float,
               pattern: SparsityPattern) -> torch.Tensor:
        """The OBS sweep over the columns with ``upper`` (only its upper triangle is read)."""
        # Work on the transpose so that a column of W is a contiguous row (one fp32 copy, no temporary).
        wt = torch.empty(weight.shape[1], weight.shape[0], dtype=torch.float32, device=weight.device)
        wt.copy_(weight.detach().t())
        wt[dead] = 0
        columns, rows = wt.shape
        keep_t = torch.ones_like(wt, dtype=torch.bool)
        step = self.block_size
        inner = 16
        if pattern.is_nm:
            step = max(pattern.m, step - step % pattern.m)
            inner = max(pattern.m, inner - inner % pattern.m)
        for start in range(0, columns, step):
            end = min(start + step, columns)
            block = wt[start:end]
            inv_block = upper[start:end, start:end]
            diag = inv_block.diagonal()
            keep = keep_t[start:end]
            if not pattern.is_nm:
                # Cumulative rounding makes the layer's total count exact whatever the block sizes.
                count = int(sparsity * rows * end + 0.5) - int(sparsity * rows * start + 0.5)
                keep.copy_(_drop_lowest(block.square() / diag.unsqueeze(1).square(), count))
            errors = torch.zeros_like(block)
            # scale[i] = pruned_i / d_i: the error of column i is its pruned weights over [H⁻¹]_ii.
            scale = (~keep).to(block.dtype).div_(diag.unsqueeze(1))
            count = end - start
            # Two-level lazy updates: rank-1 updates stay inside a small sub-block, and each
            # finished sub-block reaches the rest of the block as one matrix product. Same
            # arithmetic as the column-by-column sweep, a fraction of its memory traffic.
            for sub_start in range(0, count, inner):
                sub_end = min(sub_start + inner, count)
                for i in range(sub_start, sub_end):
                    if pattern.is_nm and i % pattern.m == 0:
                        group = block[i:i + pattern.m].square() / diag[i:i + pattern.m].unsqueeze(1).square()
                        top = torch.topk(group, pattern.n, dim=0, largest=True, sorted=False).indices
                        keep[i:i + pattern.m] = False
                        keep[i:i + pattern.m].scatter_(0, top, True)
                        scale[i:i + pattern.m] = ((~keep[i:i + pattern.m]).to(block.dtype)
                                                  / diag[i:i + pattern.m].unsqueeze(1))
                    error = torch.mul(block[i], scale[i], out=errors[i])
                    # Column i itself ends at 0 (pruned) or unchanged (kept), so only later columns move.
                    if i + 1 < sub_end:
                        block[i + 1:sub_end].addr_(inv_block[i, i + 1:sub_end], error, alpha=-1)
                if sub_end < count:
                    block[sub_end:].addmm_(inv_block[sub_start:sub_end, sub_end:].t(), errors[sub_start:sub_end],
                                           alpha=-1)
            block.masked_fill_(~keep, 0)  # +0.0: a product with the mask would leave -0.0 bit patterns
            if end < columns:
                wt[end:].addmm_(upper[start:end, end:].t(), errors, alpha=-1)
        weight.copy_(wt.t())
        return keep_t.t()
