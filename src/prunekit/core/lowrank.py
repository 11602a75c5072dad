"""Low-rank linear layers and the whitened truncated SVD that fits them.

Two layers share one storage convention: a rank-r product kept as two thin linears, ``lowrank_in``
(r × in, no bias) and ``lowrank_out`` (out × r).

- ``LowRankCorrectedLinear`` is still an ``nn.Linear`` (its sparse ``weight`` and ``bias`` keep their
  names, so masks, adapters and the compressed format see the sparse part as before) plus the
  correction: ``y = x Sᵀ + b + lowrank_out(lowrank_in(x))``.
- ``FactoredLinear`` replaces a linear by the product alone (SVD-LLM): ``y = lowrank_out(lowrank_in(x))``.

The model's config records every such layer under ``prunekit_lowrank`` (name -> kind and rank), so a saved
directory says which modules to rebuild before its tensors are loaded (``restore_lowrank``).

The fit: with ``H = X Xᵀ / n`` the layer's input second moment and ``H + δ I = C Cᵀ`` its (dampened)
Cholesky factorisation, ``‖(E − L R) X‖²_F / n = ‖(E − L R) C‖²_F`` up to the dampening term, so the best
rank-r ``L R`` is the truncated SVD of ``E C`` mapped back by ``C⁻¹`` (Eckart–Young in the whitened
coordinates; SVD-LLM's truncation-aware whitening).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.errors import PrunekitError

CONFIG_KEY = "prunekit_lowrank"
CORRECTION = "correction"
FACTORED = "factored"


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


_KINDS: dict[str, type[nn.Module]] = {CORRECTION: LowRankCorrectedLinear, FACTORED: FactoredLinear}


def _record(model: nn.Module, name: str, kind: str, rank: int, bias: bool) -> None:
    config = getattr(model, "config", None)
    if config is None:
        return
    entries = dict(getattr(config, CONFIG_KEY, None) or {})
    entries[name] = {"kind": kind, "rank": rank, "bias": bias}
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


def restore_lowrank(model: nn.Module) -> nn.Module:
    """Rebuild, as empty meta-device modules, the low-rank layers the model's config records (before loading)."""
    config = getattr(model, "config", None)
    entries = getattr(config, CONFIG_KEY, None) or {}
    if not isinstance(entries, dict):
        raise PrunekitError(f"the config's {CONFIG_KEY} is not a mapping of layer names")
    for name, entry in entries.items():
        try:
            kind, rank, bias = entry["kind"], int(entry["rank"]), bool(entry["bias"])
            module = model.get_submodule(name)
        except (AttributeError, KeyError, TypeError, ValueError):
            raise PrunekitError(f"the config's {CONFIG_KEY} entry for {name!r} does not match the model") from None
        if kind not in _KINDS:
            raise PrunekitError(f"the config's {CONFIG_KEY} names an unknown kind {kind!r} for {name}")
        if type(module) is _KINDS[kind]:
            continue
        if not isinstance(module, nn.Linear):
            raise PrunekitError(f"{name} is a {type(module).__name__}, not the linear its {CONFIG_KEY} entry says")
        dtype = module.weight.dtype
        _replace(model, name, _KINDS[kind](module.in_features, module.out_features, rank, bias=bias,
                                           device="meta", dtype=dtype))
    return model


def lowrank_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: module for name, module in model.named_modules()
            if isinstance(module, (LowRankCorrectedLinear, FactoredLinear))}


def lowrank_parameters(model: nn.Module) -> int:
    """Parameters held by the low-rank factors (biases excluded: a factored layer keeps its own)."""
    return sum(module.lowrank_in.weight.numel() + module.lowrank_out.weight.numel()
               for module in lowrank_layers(model).values())


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
