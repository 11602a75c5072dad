"""Sparse + low-rank, the fit itself: the whitened correction never increases a layer's error, and its closed-form
error curve is the measured one."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prunekit.core.calibration import Target
from prunekit.core.lowrank import LowRankCorrectedLinear, whitened_svd, whitening_factor
from prunekit.core.patterns import SparsityPattern
from prunekit.core.statistics import InputHessian
from prunekit.weights import get_method
from prunekit.weights.lowrank import LowRankCorrection, LowRankSettings


def _error(matrix, x):
    return float((x @ matrix.double().T).square().sum() / x.shape[0])


@settings(max_examples=25, deadline=None)
@given(out_features=st.integers(4, 24), in_features=st.sampled_from([8, 12, 16]), samples=st.integers(2, 40),
       seed=st.integers(0, 10_000), dampening=st.sampled_from([1e-4, 0.01, 0.3]))
def test_the_correction_never_increases_the_whitened_layer_error(out_features, in_features, samples, seed, dampening):
    """On random layers and inputs (rank-deficient ones too), every rank the correction may take leaves
    ‖(W − S − L R) X‖ no larger than ‖(W − S) X‖, and the closed-form error curve is the measured one."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator)
    x = torch.randn(samples, in_features, generator=generator) * torch.rand(in_features, generator=generator) * 3
    target = Target("layer", torch.nn.Linear(in_features, out_features, bias=False), 0)
    target.module.weight.data.copy_(weight)
    stats = InputHessian(in_features)
    stats.add(x)
    get_method("magnitude").prune(target.weight, None, 0.5, SparsityPattern.parse("2:4"))
    correction = LowRankCorrection(LowRankSettings(budget=0.2, layer_cap=0.9, dampening=dampening, iterations=0,
                                                   allocation="global"))
    correction.fit(target, weight, stats)
    fit = correction.fits["layer"]
    x64 = x.double()
    error = weight.double() - target.weight.double()
    before = _error(error, x64)
    assert fit.svd.errors[0].item() == pytest.approx(before, rel=1e-5, abs=1e-7)  # X Xᵀ sums in float32
    for rank in range(1, fit.svd.singular.numel() + 1):
        left, right = fit.svd.factors(rank, torch.float64)
        measured = _error(error - left @ right, x64)
        assert measured == pytest.approx(fit.svd.errors[rank].item(), rel=1e-5, abs=1e-6 * before)
    model = torch.nn.Sequential()
    model.add_module("layer", target.module)
    attached = correction.attach(model).layers[0]
    assert attached.error_after <= attached.error_before * (1 + 1e-12)
    if attached.rank:
        corrected = model.layer
        assert isinstance(corrected, LowRankCorrectedLinear)
        with torch.no_grad():
            out = corrected(x).double() - x64 @ weight.double().T
        assert float(out.square().sum() / samples) == pytest.approx(attached.error_after, rel=1e-4, abs=1e-5)


def test_full_rank_whitened_svd_reproduces_the_matrix():
    generator = torch.Generator().manual_seed(0)
    matrix = torch.randn(10, 7, generator=generator, dtype=torch.float64)
    x = torch.randn(50, 7, generator=generator, dtype=torch.float64)
    svd = whitened_svd(matrix, whitening_factor(x.T @ x / 50, 0.01))
    left, right = svd.factors(7, torch.float64)
    assert torch.allclose(left @ right, matrix, atol=1e-10)
    assert svd.errors[-1].item() == pytest.approx(0.0, abs=1e-9)
