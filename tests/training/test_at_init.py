"""SNIP, GraSP, SynFlow and random pruning at initialisation, checked against hand computations."""

import pytest
import torch
from torch import nn

from prunekit.core.masks import pruned_count
from prunekit.training import SNIP, GraSP, RandomPruning, SynFlow
from tests.training._helpers import batches, tiny_cnn, tiny_mlp


def _top_global(scores: dict, sparsity: float) -> dict:
    """The global keep-masks by hand: drop the lowest scores over all layers together."""
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    count = pruned_count(flat.numel(), sparsity)
    threshold = flat.sort().values[count - 1]
    return {name: s > threshold for name, s in scores.items()}


def test_snip_matches_connection_sensitivity_by_hand():
    model = tiny_mlp()
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    reference = tiny_mlp()
    loss = nn.functional.cross_entropy(reference(x), y)
    linears = [m for m in reference if isinstance(m, nn.Linear)]
    grads = torch.autograd.grad(loss, [m.weight for m in linears])
    names = ["1", "3", "5"]
    expected = _top_global({n: (g * m.weight).abs().detach() for n, g, m in zip(names, grads, linears)}, 0.8)
    sparsifier = SNIP(model, 0.8, data=[(x, y)])
    for name in names:
        assert torch.equal(sparsifier._by_name[name].mask, expected[name])


def test_grasp_matches_the_hessian_gradient_product_by_hand():
    model = tiny_mlp()
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    reference = tiny_mlp()
    weights = [m.weight for m in reference if isinstance(m, nn.Linear)]
    loss = lambda: nn.functional.cross_entropy(reference(x) / 200.0, y)  # noqa: E731
    g = [t.detach() for t in torch.autograd.grad(loss(), weights)]
    first = torch.autograd.grad(loss(), weights, create_graph=True)
    hg = torch.autograd.grad(sum((a * b).sum() for a, b in zip(first, g)), weights)
    # GraSP removes the largest −θ·Hg, i.e. keeps the largest θ·Hg
    expected = _top_global({n: (w * h).detach() for n, w, h in zip(["1", "3", "5"], weights, hg)}, 0.7)
    sparsifier = GraSP(model, 0.7, data=[(x, y)])
    for name, mask in expected.items():
        assert torch.equal(sparsifier._by_name[name].mask, mask)


def test_synflow_mask_does_not_depend_on_the_input():
    masks = []
    for example in (torch.randn(4, 1, 16, 16), torch.rand(7, 1, 16, 16) * 100, torch.zeros(1, 1, 16, 16)):
        sparsifier = SynFlow(tiny_cnn(), 0.9, example_input=example, iterations=20)
        masks.append(sparsifier.masks())
    by_shape = SynFlow(tiny_cnn(), 0.9, input_shape=(1, 16, 16), iterations=20).masks()
    for other in masks[1:] + [by_shape]:
        assert all(torch.equal(masks[0][k], other[k]) for k in masks[0])


def test_synflow_single_iteration_matches_the_flow_by_hand_and_leaves_the_model_alone():
    model = tiny_mlp()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    sparsifier = SynFlow(model, 0.6, input_shape=(64,), iterations=1)
    reference = tiny_mlp().double()
    with torch.no_grad():
        for p in reference.parameters():
            p.abs_()
    weights = [m.weight for m in reference if isinstance(m, nn.Linear)]
    flow = reference(torch.ones(1, 64, dtype=torch.float64)).sum()
    grads = torch.autograd.grad(flow, weights)
    expected = _top_global({n: (w * g).abs().detach() for n, w, g in zip(["1", "3", "5"], weights, grads)}, 0.6)
    for name, mask in expected.items():
        assert torch.equal(sparsifier._by_name[name].mask, mask)
    for key, value in model.state_dict().items():
        if key.endswith(".original"):
            original = state[key.replace("parametrizations.weight.original", "weight")]
            mask = model.state_dict()[key.replace("original", "0.mask")]
            assert torch.equal(value, original * mask)


def test_synflow_iterating_avoids_layer_collapse_at_extreme_sparsity():
    sparsifier = SynFlow(tiny_cnn(), 0.99, input_shape=(1, 16, 16), iterations=50)
    assert all(layer.active > 0 for layer in sparsifier.layers)
    assert sparsifier.sparsity == pytest.approx(0.99, abs=1e-3)


def test_scoring_leaves_buffers_and_grads_untouched():
    model = tiny_cnn()
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    SNIP(model, 0.5, data=batches(2), batches=2)
    GraSP(tiny_cnn(), 0.5, data=batches(1))
    for name, value in model.named_buffers():
        if name in buffers:
            assert torch.equal(value, buffers[name]), name
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("distribution", ["uniform", "erk"])
def test_random_pruning_follows_the_distribution_exactly_and_is_seeded(distribution):
    from prunekit.core.allocation import get_allocation

    first = RandomPruning(tiny_cnn(), 0.9, distribution, seed=3)
    again = RandomPruning(tiny_cnn(), 0.9, distribution, seed=3)
    other = RandomPruning(tiny_cnn(), 0.9, distribution, seed=4)
    expected = get_allocation(distribution).allocate([l.info() for l in first.layers], 0.9, None)
    for layer in first.layers:
        assert layer.numel - layer.active == pruned_count(layer.numel, expected[layer.name])
    assert all(torch.equal(a, b) for a, b in zip(first.masks().values(), again.masks().values()))
    assert any(not torch.equal(a, b) for a, b in zip(first.masks().values(), other.masks().values()))
