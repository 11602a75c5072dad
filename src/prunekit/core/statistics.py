"""Per-layer statistics of a linear layer's calibration inputs, accumulated batch by batch."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch

from prunekit.core.lowrank import whitening_factor

try:  # symmetric rank-k update: half the multiply-adds of X Xᵀ through a general matmul
    from scipy.linalg.blas import ssyrk as _ssyrk
except ImportError:  # pragma: no cover - scipy comes with gensim
    _ssyrk = None

_blas_threads: int | None = None


def match_blas_threads() -> None:
    """Give scipy's BLAS the thread count torch uses.

    OpenBLAS otherwise takes its thread count from the environment (OPENBLAS_NUM_THREADS, then
    OMP_NUM_THREADS, then the core count), and a different count sums in a different order: the
    same command gave a different Hessian, hence different SparseGPT weights, depending on an
    environment variable. With this, ``--threads`` (``torch.set_num_threads``) decides both.
    """
    global _blas_threads
    wanted = torch.get_num_threads()
    if wanted != _blas_threads:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=wanted, user_api="blas")
        _blas_threads = wanted


class LayerStatistics:
    """Base class: ``add`` sees each batch of inputs (..., in_features) once."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.in_features = in_features
        self.rows = 0

    def add(self, inputs: torch.Tensor) -> None:
        raise NotImplementedError

    def accumulators(self) -> list[torch.Tensor]:
        """The tensors that are sums over inputs (what merging across processes adds up)."""
        raise NotImplementedError

    @staticmethod
    def _flatten(inputs: torch.Tensor) -> torch.Tensor:
        return inputs.reshape(-1, inputs.shape[-1]).float()


class InputNorms(LayerStatistics):
    """Squared L2 norm of every input feature over all calibration tokens (Wanda's ``‖X_j‖²``)."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        super().__init__(in_features, device)
        self.squared_sum = torch.zeros(in_features, dtype=torch.float64, device=device)

    def add(self, inputs: torch.Tensor) -> None:
        x = self._flatten(inputs)
        self.squared_sum += torch.linalg.vector_norm(x, dim=0).double().square()
        self.rows += x.shape[0]

    def norms(self) -> torch.Tensor:
        return self.squared_sum.sqrt().float()

    def accumulators(self) -> list[torch.Tensor]:
        return [self.squared_sum]

    def merge_(self, other: "InputNorms") -> "InputNorms":
        self.squared_sum += other.squared_sum.to(self.squared_sum.device)
        self.rows += other.rows
        return self


class InputHessian(InputNorms):
    """``X Xᵀ`` over calibration tokens, the layer-wise Hessian of the squared reconstruction error.

    It carries the input norms too (its diagonal), so one pass serves magnitude-, Wanda- and
    SparseGPT-style criteria alike.
    """

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        super().__init__(in_features, device)
        self.gram = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        # Decided once, so the storage is either all upper-triangular or all symmetric.
        self.upper_only = _ssyrk is not None and self.gram.device.type == "cpu"

    def add(self, inputs: torch.Tensor) -> None:
        x = self._flatten(inputs).detach()
        if self.upper_only:
            match_blas_threads()
            # Column-major views of the same memory: BLAS updates the lower triangle of gramᵀ,
            # i.e. the upper triangle of gram, which is all ``hessian()`` reads.
            target = self.gram.numpy().T
            result = _ssyrk(1.0, x.contiguous().numpy().T, beta=1.0, c=target, trans=0, lower=1, overwrite_c=1)
            if not np.shares_memory(result, target):
                self.gram.copy_(torch.from_numpy(np.ascontiguousarray(result.T)))
        else:
            self.gram.addmm_(x.T, x)
        self.rows += x.shape[0]

    def accumulators(self) -> list[torch.Tensor]:
        return [self.gram]

    def gram_matrix(self) -> torch.Tensor:
        """The full symmetric ``X Xᵀ`` (a fresh tensor)."""
        if not self.upper_only:
            return self.gram.clone()
        full = self.gram + self.gram.T  # the lower triangle is still all zeros
        full.diagonal().sub_(self.gram.diagonal())
        return full

    def norms(self) -> torch.Tensor:
        return self.gram.diagonal().clamp_min(0).sqrt()

    def hessian(self) -> torch.Tensor:
        """``2/n · X Xᵀ`` (a fresh tensor, so the shared accumulator is never modified)."""
        return self.gram_matrix().mul_(2.0 / max(self.rows, 1))

    @contextmanager
    def lent_hessian(self, rows_per_step: int = 256) -> Iterator[torch.Tensor]:
        """Lend the accumulator itself with ``2/n · X Xᵀ`` in its upper triangle, for in-place
        factorisations that read and write only that triangle; no d×d copy is made.

        Meanwhile the lower triangle holds the raw sums (mirrored), from which the accumulator is
        restored bit for bit on exit, so layers sharing these statistics still see them. Only for
        upper-triangular storage (``upper_only``)."""
        if not self.upper_only:
            raise ValueError("lent_hessian needs upper-triangular storage")
        gram = self.gram
        size = gram.shape[0]
        diagonal = gram.diagonal().clone()
        scale = 2.0 / max(self.rows, 1)
        for start in range(0, size, rows_per_step):
            end = min(start + rows_per_step, size)
            gram[end:, start:end] = gram[start:end, end:].T
            gram[start:end, end:].mul_(scale)
            block = gram[start:end, start:end]
            upper = torch.ones(end - start, end - start, dtype=torch.bool, device=gram.device).triu()
            block.copy_(torch.where(upper, block * scale, block.T))
        try:
            yield gram
        finally:
            for start in range(0, size, rows_per_step):
                end = min(start + rows_per_step, size)
                gram[start:end, end:] = gram[end:, start:end].T
                gram[end:, start:end] = 0
                block = gram[start:end, start:end]
                upper = torch.ones(end - start, end - start, dtype=torch.bool, device=gram.device).triu()
                block.copy_(torch.where(upper, block.T, torch.zeros((), dtype=block.dtype, device=block.device)))
            gram.diagonal().copy_(diagonal)

    def merge_(self, other: "InputHessian") -> "InputHessian":  # type: ignore[override]
        if self.upper_only != other.upper_only:
            self.gram, self.upper_only = self.gram_matrix(), False
            other_gram = other.gram_matrix()
        else:
            other_gram = other.gram
        self.gram += other_gram.to(self.gram.device)
        self.rows += other.rows
        return self


class TwinInputHessian(InputHessian):
    """``X Xᵀ`` of a layer's inputs in the model being pruned, and ``Dᵀ = Σ (X_d − X)ᵀ X`` against the inputs
    ``X_d`` the dense model gives the same layer for the same tokens (a dense twin of the calibration stream).

    With both, a layer can be fitted to the dense model's output rather than to its own: the least-squares
    ``M`` of ``‖W X_d − M X‖`` is ``W* = W + (W D)(X Xᵀ)⁻¹`` (``dense_output_weight``),
    and ``‖W X_d − M X‖² = ‖(W* − M) X‖² + const``, so any method that prunes ``W`` in the ``X Xᵀ`` norm prunes
    ``W*`` in it for the asymmetric objective (GPTAQ's observation for quantisation). ``add(x)`` alone pairs
    the inputs with themselves: no shift (routed experts, whose tokens differ between the streams).
    """

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        super().__init__(in_features, device)
        self.shift = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)

    def add_pair(self, inputs: torch.Tensor, dense_inputs: torch.Tensor) -> None:
        if dense_inputs.shape != inputs.shape:
            raise ValueError(f"dense inputs {tuple(dense_inputs.shape)} do not match inputs {tuple(inputs.shape)}")
        x = self._flatten(inputs).detach()
        self.shift.addmm_((self._flatten(dense_inputs).detach() - x).T, x)
        self.add(inputs)

    def accumulators(self) -> list[torch.Tensor]:
        return [self.gram, self.shift]

    def merge_(self, other: "TwinInputHessian") -> "TwinInputHessian":  # type: ignore[override]
        super().merge_(other)
        self.shift += other.shift.to(self.shift.device)
        return self

    @torch.no_grad()
    def dense_output_weight(self, weight: torch.Tensor, dampening: float) -> torch.Tensor:
        """``W* = W + (W D)(X Xᵀ + λI)⁻¹``, ``λ`` = ``dampening`` × the mean diagonal; ``weight`` itself (the same
        tensor) where the two streams agreed on every token."""
        if self.rows == 0 or not bool(self.shift.any()):
            return weight
        # X Xᵀ + λI, dampened further where dead inputs leave it singular (SparseGPT's remedy)
        factor = whitening_factor(self.gram_matrix(), dampening).factor
        moved = weight.to(torch.float64) @ self.shift.to(torch.float64)
        return (weight.to(torch.float64) + torch.cholesky_solve(moved.T, factor).T).to(weight.dtype)
