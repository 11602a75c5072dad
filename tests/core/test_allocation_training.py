"""ER, ERK and LAMP allocations: hand-computed densities, exact totals, the LAMP rule."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prunekit.core.allocation import LayerInfo, get_allocation
from prunekit.core.allocation.lamp import lamp_scores
from prunekit.core.masks import pruned_count
from prunekit.errors import PrunekitError

CNN = [LayerInfo("conv1", (32, 1, 3, 3)), LayerInfo("conv2", (64, 32, 3, 3)), LayerInfo("fc1", (128, 3136)),
       LayerInfo("fc2", (10, 128))]


def _kept(layers, result):
    return sum((1 - result[l.name]) * l.numel for l in layers)


@pytest.mark.parametrize("name", ["er", "erk"])
@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.9, 0.95, 0.98])
def test_total_is_exact_and_densities_follow_the_raw_scale(name, sparsity):
    allocation = get_allocation(name)
    result = allocation.allocate(CNN, sparsity, None)
    total = sum(l.numel for l in CNN)
    assert _kept(CNN, result) == pytest.approx((1 - sparsity) * total, rel=1e-9)
    sparse = [l for l in CNN if result[l.name] > 0]
    # every sparse layer's density is the same multiple ε of its raw scale; dense layers would exceed it
    ratios = {(1 - result[l.name]) / allocation.raw_density(l) for l in sparse}
    assert max(ratios) == pytest.approx(min(ratios), rel=1e-9)
    epsilon = ratios.pop()
    for layer in CNN:
        if result[layer.name] == 0:
            assert epsilon * allocation.raw_density(layer) >= 1 - 1e-12


def test_erk_hand_computed_for_two_linear_layers():
    layers = [LayerInfo("a", (100, 100)), LayerInfo("b", (10, 1000))]
    # raw: a (200/10000) = 0.02, b (1010/10000) = 0.101; 50 % kept of 20000 -> ε·(0.02·10⁴ + 0.101·10⁴) = 10⁴
    result = get_allocation("erk").allocate(layers, 0.5, None)
    epsilon = 10_000 / (0.02 * 10_000 + 0.101 * 10_000)
    assert result["a"] == pytest.approx(1 - 0.02 * epsilon)
    assert result["b"] == pytest.approx(1 - 0.101 * epsilon)


def test_er_ignores_the_kernel_and_erk_counts_it():
    conv = LayerInfo("conv", (64, 32, 3, 3))
    assert get_allocation("er").raw_density(conv) == pytest.approx((64 + 32) / (64 * 32))
    assert get_allocation("erk").raw_density(conv) == pytest.approx((64 + 32 + 3 + 3) / (64 * 32 * 9))
    assert get_allocation({"name": "erk", "power": 0.5}).raw_density(conv) == pytest.approx(
        math.sqrt((64 + 32 + 3 + 3) / (64 * 32 * 9)))


def test_erk_dense_first_layer_keeps_it_dense_and_still_hits_the_target():
    result = get_allocation({"name": "erk", "dense_first_layer": True}).allocate(CNN, 0.9, None)
    assert result["conv1"] == 0.0
    assert _kept(CNN, result) == pytest.approx(0.1 * sum(l.numel for l in CNN), rel=1e-9)


def test_erk_unreachable_target_is_an_error():
    layers = [LayerInfo("big", (1000, 1000)), LayerInfo("small", (10, 10))]
    with pytest.raises(PrunekitError, match="cannot be reached"):
        get_allocation({"name": "erk", "dense_first_layer": True}).allocate(layers, 0.5, None)
    with pytest.raises(PrunekitError, match="allocation erk: power"):
        get_allocation({"name": "erk", "power": 2})


def test_lamp_scores_match_the_definition():
    weights = torch.tensor([[0.5, -2.0], [1.0, 0.1]])
    # ascending squares: 0.01, 0.25, 1, 4; suffix sums: 5.26, 5.25, 5, 4
    expected = torch.tensor([[0.25 / 5.25, 4 / 4], [1 / 5, 0.01 / 5.26]], dtype=torch.float64)
    assert torch.allclose(lamp_scores(weights), expected)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.05, 0.97))
def test_lamp_is_exact_and_never_empties_a_layer(seed, sparsity):
    generator = torch.Generator().manual_seed(seed)
    layers = [LayerInfo("a", (6, 5)), LayerInfo("b", (20, 3)), LayerInfo("c", (2, 2))]
    weights = {l.name: torch.randn(l.shape, generator=generator) * (i + 1) for i, l in enumerate(layers)}
    result = get_allocation("lamp").allocate(layers, sparsity, lambda name: weights[name].abs())
    pruned = sum(round(result[l.name] * l.numel) for l in layers)
    assert pruned == pruned_count(sum(l.numel for l in layers), sparsity)
    for layer in layers:
        assert round(result[layer.name] * layer.numel) < layer.numel  # the largest weight (LAMP 1) survives


def test_lamp_differs_from_global_magnitude_on_unequal_scales():
    """A layer of tiny weights is wiped out by a global magnitude threshold but not by LAMP."""
    layers = [LayerInfo("tiny", (10, 10)), LayerInfo("large", (10, 10))]
    generator = torch.Generator().manual_seed(0)
    weights = {"tiny": torch.rand(10, 10, generator=generator) * 1e-3,
               "large": torch.rand(10, 10, generator=generator) + 1}
    scores = lambda name: weights[name]  # noqa: E731
    global_result = get_allocation("global").allocate(layers, 0.5, scores)
    lamp_result = get_allocation("lamp").allocate(layers, 0.5, scores)
    assert global_result["tiny"] == 1.0
    assert lamp_result["tiny"] < 1.0 and lamp_result["large"] > 0.0
