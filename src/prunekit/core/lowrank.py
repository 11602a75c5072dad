"""Low-rank linear layers and the whitened truncated SVD that fits them.

Two layers share one storage convention: a rank-r product kept as two thin linears, ``lowrank_in``
(r × in, no bias) and ``lowrank_out`` (out × r).

- ``LowRankCorrectedLinear`` is still an ``nn.Linear`` (its sparse ``weight`` and ``bias`` keep their
  names, so masks, adapters and the compressed format see the sparse part as before) plus the
  correction: ``y = x Sᵀ + b + lowrank_out(lowrank_in(x))``.
- ``FactoredLinear`` replaces a linear by the product alone (SVD-LLM): ``y = lowrank_out(lowrank_in(x))``.

A third layer keeps the same idea with another shape: ``ArmorLinear`` (ARMOR, ``weights.armor``) is an
``nn.Linear`` whose sparse ``weight`` ``S`` sits between two block-diagonal factors, ``y = A S B x + b``, ``A``
(``armor_out``) and ``B`` (``armor_in``) stored as stacks of ``block × block`` blocks.

The model's config records every such layer under ``prunekit_lowrank`` (name -> kind, and rank or block
size), so a saved directory says which modules to rebuild before its tensors are loaded (``restore_lowrank``).

The fit: with ``H = X Xᵀ / n`` the layer's input second moment and ``H + δ I = C Cᵀ`` its (dampened)
Cholesky factorisation, ``‖(E − L R) X‖²_F / n = ‖(E − L R) C‖²_F`` up to the dampening term, so the best
rank-r ``L R`` is the truncated SVD of ``E C`` mapped back by ``C⁻¹`` (Eckart–Young in the whitened
coordinates; SVD-LLM's truncation-aware whitening).
"""

from __future__ import annotations

from dataclasses import dataclass

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.errors import PrunekitError

CONFIG_KEY = "prunekit_lowrank"
CORRECTION = "correction"
FACTORED = "factored"
ARMOR = "armor"


class LowRankCorrectedLinear(nn.Linear):
    """A (sparse) linear plus a rank-r correction stored as two thin linears beside it."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.rank = rank
        self.lowrank_in = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.lowrank_out = nn.Linear(rank, out_features, bias=False, device=device, dtype=dtype)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return F.linear(inputs, self.weight, self.bias) + self.lowrank_out(self.lowrank_in(inputs))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", rank={self.rank}"


class FactoredLinear(nn.Module):
    """A linear replaced by the product of two thin ones (``in -> rank -> out``)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.lowrank_in = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.lowrank_out = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.lowrank_out(self.lowrank_in(inputs))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def block_diagonal_apply(blocks: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """``inputs @ Dᵀ`` for ``D`` the block-diagonal matrix of ``blocks`` (n × b × b): each block maps its own
    ``b`` consecutive features of the last dimension."""
    count, size, _ = blocks.shape
    grouped = inputs.reshape(*inputs.shape[:-1], count, size)
    return torch.einsum("...jc,jrc->...jr", grouped, blocks).reshape(inputs.shape)


def block_diagonal(blocks: torch.Tensor) -> torch.Tensor:
    """The dense (n·b) × (n·b) matrix of the blocks (for tests and checks; the layers never build it)."""
    return torch.block_diag(*blocks.unbind(0))


class ArmorLinear(nn.Linear):
    """A (sparse) linear between two block-diagonal factors: ``y = A (S (B x)) + b``.

    ``weight`` is ``S`` and stays what masks, N:M checks and the compressed format read; ``armor_in`` holds
    ``B``'s ``in / block`` blocks, ``armor_out`` ``A``'s ``out / block`` blocks (each ``block × block``)."""

    def __init__(self, in_features: int, out_features: int, block: int, bias: bool = True,
                 device=None, dtype=None) -> None:
        if block < 1 or in_features % block or out_features % block:
            raise PrunekitError(f"ARMOR block size {block} does not divide the layer's {out_features} × {in_features}")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.block = block
        self.armor_in = nn.Parameter(torch.empty(in_features // block, block, block, device=device, dtype=dtype))
        self.armor_out = nn.Parameter(torch.empty(out_features // block, block, block, device=device, dtype=dtype))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        mixed = F.linear(block_diagonal_apply(self.armor_in, inputs), self.weight)
        output = block_diagonal_apply(self.armor_out, mixed)
        return output if self.bias is None else output + self.bias

    def extra_repr(self) -> str:
        return super().extra_repr() + f", block={self.block}"


_KINDS: dict[str, type[nn.Module]] = {CORRECTION: LowRankCorrectedLinear, FACTORED: FactoredLinear,
                                      ARMOR: ArmorLinear}
# What each kind's size means in its record (and its constructor's third argument).
_SIZE_KEY = {CORRECTION: "rank", FACTORED: "rank", ARMOR: "block"}


def _record(model: nn.Module, name: str, kind: str, size: int, bias: bool) -> None:
    config = getattr(model, "config", None)
    if config is None:
        return
    entries = dict(getattr(config, CONFIG_KEY, None) or {})
    entries[name] = {"kind": kind, _SIZE_KEY[kind]: size, "bias": bias}
    setattr(config, CONFIG_KEY, entries)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attribute = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attribute, module)


def _linear(model: nn.Module, name: str, left: torch.Tensor, right: torch.Tensor) -> nn.Linear:
    module = model.get_submodule(name)
    if type(module) is not nn.Linear:
        raise PrunekitError(f"{name} is a {type(module).__name__}; only plain nn.Linear layers take a low-rank form")
    if (left.shape[0], right.shape[1]) != (module.out_features, module.in_features) or left.shape[1] != right.shape[0]:
        raise PrunekitError(f"factors {tuple(left.shape)} × {tuple(right.shape)} do not fit {name} "
                            f"({module.out_features} × {module.in_features})")
    return module


@torch.no_grad()
def attach_correction(model: nn.Module, name: str, left: torch.Tensor, right: torch.Tensor) -> LowRankCorrectedLinear:
    """Give the linear ``name`` the correction ``left @ right`` (out × r, r × in), keeping its own tensors."""
    linear = _linear(model, name, left, right)
    rank = left.shape[1]
    weight = linear.weight
    corrected = LowRankCorrectedLinear(linear.in_features, linear.out_features, rank, bias=linear.bias is not None,
                                       device="meta", dtype=weight.dtype)
    corrected.weight, corrected.bias = linear.weight, linear.bias
    corrected.lowrank_in = nn.Linear(linear.in_features, rank, bias=False, device=weight.device, dtype=weight.dtype)
    corrected.lowrank_out = nn.Linear(rank, linear.out_features, bias=False, device=weight.device, dtype=weight.dtype)
    corrected.lowrank_in.weight.copy_(right)
    corrected.lowrank_out.weight.copy_(left)
    corrected.train(linear.training)
    _replace(model, name, corrected)
    _record(model, name, CORRECTION, rank, linear.bias is not None)
    return corrected


@torch.no_grad()
def factor_linear(model: nn.Module, name: str, left: torch.Tensor, right: torch.Tensor) -> FactoredLinear:
    """Replace the linear ``name`` by ``left @ right`` (out × r, r × in); its bias moves to ``lowrank_out``."""
    linear = _linear(model, name, left, right)
    rank = left.shape[1]
    weight = linear.weight
    factored = FactoredLinear(linear.in_features, linear.out_features, rank, bias=linear.bias is not None,
                              device=weight.device, dtype=weight.dtype)
    factored.lowrank_in.weight.copy_(right)
    factored.lowrank_out.weight.copy_(left)
    if linear.bias is not None:
        factored.lowrank_out.bias.copy_(linear.bias)
    factored.train(linear.training)
    _replace(model, name, factored)
    _record(model, name, FACTORED, rank, linear.bias is not None)
    return factored


@torch.no_grad()
def attach_armor(model: nn.Module, name: str, outer: torch.Tensor, sparse: torch.Tensor,
                 inner: torch.Tensor) -> ArmorLinear:
    """Make the linear ``name`` compute ``A S B x + b``: ``outer`` holds ``A``'s blocks, ``inner`` ``B``'s (each
    n × b × b), ``sparse`` becomes its weight; its bias is kept."""
    module = model.get_submodule(name)
    if type(module) is not nn.Linear:
        raise PrunekitError(f"{name} is a {type(module).__name__}; only plain nn.Linear layers take an ARMOR form")
    block = inner.shape[-1]
    if (tuple(sparse.shape) != (module.out_features, module.in_features) or outer.shape[1:] != (block, block)
            or inner.shape[1:] != (block, block) or outer.shape[0] * block != module.out_features
            or inner.shape[0] * block != module.in_features):
        raise PrunekitError(f"ARMOR factors {tuple(outer.shape)}, {tuple(sparse.shape)}, {tuple(inner.shape)} do not "
                            f"fit {name} ({module.out_features} × {module.in_features})")
    weight = module.weight
    layer = ArmorLinear(module.in_features, module.out_features, block, bias=module.bias is not None,
                        device="meta", dtype=weight.dtype)
    layer.weight, layer.bias = module.weight, module.bias
    layer.weight.copy_(sparse)
    layer.armor_in = nn.Parameter(inner.to(device=weight.device, dtype=weight.dtype).clone())
    layer.armor_out = nn.Parameter(outer.to(device=weight.device, dtype=weight.dtype).clone())
    layer.train(module.training)
    _replace(model, name, layer)
    _record(model, name, ARMOR, block, module.bias is not None)
    return layer


def restore_lowrank(model: nn.Module) -> nn.Module:
    """Rebuild, as empty meta-device modules, the low-rank layers the model's config records (before loading)."""
    config = getattr(model, "config", None)
    entries = getattr(config, CONFIG_KEY, None) or {}
    if not isinstance(entries, dict):
        raise PrunekitError(f"the config's {CONFIG_KEY} is not a mapping of layer names")
    for name, entry in entries.items():
        try:
            kind = entry["kind"]
            if kind not in _KINDS:
                raise PrunekitError(f"the config's {CONFIG_KEY} names an unknown kind {kind!r} for {name}")
            size, bias = int(entry[_SIZE_KEY[kind]]), bool(entry["bias"])
            module = model.get_submodule(name)
        except (AttributeError, KeyError, TypeError, ValueError):
            raise PrunekitError(f"the config's {CONFIG_KEY} entry for {name!r} does not match the model") from None
        if type(module) is _KINDS[kind]:
            continue
        if not isinstance(module, nn.Linear):
            raise PrunekitError(f"{name} is a {type(module).__name__}, not the linear its {CONFIG_KEY} entry says")
        dtype = module.weight.dtype
        _replace(model, name, _KINDS[kind](module.in_features, module.out_features, size, bias=bias,
                                           device="meta", dtype=dtype))
    return model


def lowrank_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: module for name, module in model.named_modules() if isinstance(module, tuple(_KINDS.values()))}


def lowrank_parameters(model: nn.Module) -> int:
    """Parameters held by the factors (low-rank or ARMOR's block-diagonal ones; biases and sparse weights
    excluded: a factored layer keeps its own bias)."""
    total = 0
    for module in lowrank_layers(model).values():
        if isinstance(module, ArmorLinear):
            total += module.armor_in.numel() + module.armor_out.numel()
        else:
            total += module.lowrank_in.weight.numel() + module.lowrank_out.weight.numel()
    return total


# ------------------------------------------------------------------------------ the fit

@dataclass
class WhitenedSVD:
    """``A = E C = U diag(s) Vᵀ``; ``factors(r)`` is the best rank-r ``L R`` of ``E`` in the whitened norm.

    ``errors[r]`` is the remaining error ``tr((E − L_r R_r) H (E − L_r R_r)ᵀ)`` in the *undampened* norm, for
    every kept rank r (0 included): with ``P_r = Σ_{i≤r} s_i u_i w_iᵀ`` (``w_i`` the rows of ``right``) it is
    ``‖A‖² − Σ s_i² − δ (‖E‖² − 2 Σ s_i u_iᵀ E w_i + Σ s_i² ‖w_i‖²)``, since ``H = C Cᵀ − δ I``.
    """

    left: torch.Tensor  # U, out × k
    singular: torch.Tensor  # s, k, descending
    right: torch.Tensor  # Vᵀ C⁻¹, k × in
    errors: torch.Tensor  # k + 1 undampened errors, rank 0..k

    def factors(self, rank: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``(L, R)`` with the singular values split evenly between them (balanced magnitudes for low precision)."""
        root = self.singular[:rank].double().sqrt()
        return ((self.left[:, :rank].double() * root).to(dtype),
                (root.unsqueeze(1) * self.right[:rank].double()).to(dtype))

    def gains(self) -> torch.Tensor:
        """Whitened squared error removed by each further rank (``s_i²``, dampened norm)."""
        return self.singular.double().square()


@dataclass
class Whitening:
    """``H + added · I = factor factorᵀ`` (lower Cholesky factor, float64)."""

    factor: torch.Tensor
    added: float


def whitening_factor(second_moment: torch.Tensor, dampening: float) -> Whitening:
    """Cholesky factor of ``H + dampening · mean(diag H) · I``, raising the dampening tenfold up to three
    times if ``H`` is too ill-conditioned."""
    hessian = second_moment.to(torch.float64)
    scale = float(hessian.diagonal().mean().clamp_min(1e-12))
    for attempt in range(4):
        added = dampening * scale * 10**attempt
        damped = hessian.clone()
        damped.diagonal().add_(added)
        factor, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            return Whitening(factor, added)
    raise PrunekitError("the calibration inputs' second moment is not positive definite even with 1000× "
                        "dampening; use more calibration samples")


def whitened_svd(error: torch.Tensor, whitening: Whitening, max_rank: int | None = None,
                 storage: torch.dtype = torch.float32) -> WhitenedSVD:
    """The truncated SVD of ``error @ factor``, mapped back by ``factor⁻¹``; the factors kept in ``storage``."""
    error = error.to(torch.float64)
    factor = whitening.factor
    whitened = error @ factor
    u, s, vh = torch.linalg.svd(whitened, full_matrices=False)
    keep = s.numel() if max_rank is None else min(max_rank, s.numel())
    u, s = u[:, :keep], s[:keep]
    # Vᵀ C⁻¹ = (C⁻ᵀ V)ᵀ: a triangular solve, no explicit inverse.
    right = torch.linalg.solve_triangular(factor.T, vh[:keep].T, upper=True).T
    cross = ((u.T @ error) * right).sum(dim=1)  # u_iᵀ E w_i
    squared = s.square()
    zero = torch.zeros(1, dtype=torch.float64)
    whitened_left = whitened.square().sum() - torch.cat([zero, squared.cumsum(0)])
    frobenius = error.square().sum() - torch.cat([zero, (2 * s * cross - squared * right.square().sum(dim=1)).cumsum(0)])
    errors = whitened_left - whitening.added * frobenius
    return WhitenedSVD(u.to(storage), s, right.to(storage), errors)


def output_energy(weight: torch.Tensor, whitening: Whitening) -> float:
    """``tr(W H Wᵀ)`` in the undampened norm."""
    weight = weight.to(torch.float64)
    return float((weight @ whitening.factor).square().sum() - whitening.added * weight.square().sum())


def rank_for_fraction(out_features: int, in_features: int, fraction: float) -> int:
    """The largest rank whose two factors hold at most ``fraction`` of the layer's ``out × in`` parameters."""
    return max(0, min(min(out_features, in_features), int(fraction * out_features * in_features
                                                          // (out_features + in_features))))


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a.reshape(-1), b.reshape(-1)))


def conjugate_gradients(operator: Callable[[torch.Tensor], torch.Tensor], rhs: torch.Tensor, start: torch.Tensor,
                        precondition: Callable[[torch.Tensor], torch.Tensor], steps: int) -> torch.Tensor:
    """Preconditioned conjugate gradients for ``operator(x) = rhs`` (a symmetric positive operator on tensors),
    from ``start``, at most ``steps`` steps; stops early where the curvature vanishes."""
    solution = start.clone()
    residual = rhs - operator(solution)
    direction = precondition(residual)
    product = _dot(residual, direction)
    for _ in range(steps):
        if product <= 0:
            break
        mapped = operator(direction)
        curvature = _dot(direction, mapped)
        if curvature <= 0:
            break
        step = product / curvature
        solution.add_(direction, alpha=step)
        residual.sub_(mapped, alpha=step)
        preconditioned = precondition(residual)
        following = _dot(residual, preconditioned)
        direction = preconditioned.add_(direction, alpha=following / product)
        product = following
    return solution


def refit_kept_values(target: torch.Tensor, sparse: torch.Tensor, second_moment: torch.Tensor,
                      steps: int = 25) -> torch.Tensor:
    """The values at ``sparse``'s nonzeros that best approximate ``target`` on the inputs: ``min ‖(T − S) X‖``
    with the mask fixed, ``second_moment`` = ``X Xᵀ`` (dampened). Every row is its own least-squares problem on
    its kept columns, solved together by conjugate gradients preconditioned with ``H⁻¹``; the result is never
    worse than ``sparse`` itself (the start), since each step decreases the error."""
    keep = (sparse != 0).to(second_moment.dtype)
    hessian = second_moment.to(keep.dtype)
    rhs = (target.to(keep.dtype) @ hessian) * keep
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(hessian))

    def operator(values: torch.Tensor) -> torch.Tensor:
        return (values @ hessian) * keep

    def precondition(residual: torch.Tensor) -> torch.Tensor:
        return (residual @ inverse) * keep

    return conjugate_gradients(operator, rhs, sparse.to(keep.dtype) * keep, precondition, steps)
