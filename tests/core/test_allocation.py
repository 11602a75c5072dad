import pytest
import torch

from prunekit.core.allocation import LayerInfo, apply_overrides, get_allocation
from prunekit.core.masks import pruned_count
from prunekit.errors import PrunekitError


def _layers(blocks=4, per_block=2, shape=(8, 16)):
    return [LayerInfo(f"b{b}.l{i}", shape, b) for b in range(blocks) for i in range(per_block)]


def test_uniform():
    layers = _layers()
    assert set(get_allocation("uniform").allocate(layers, 0.3, None).values()) == {0.3}


def test_global_threshold_is_exact_and_favours_large_weights():
    torch.manual_seed(0)
    layers = _layers(blocks=3, per_block=1)
    weights = {layers[0].name: torch.randn(8, 16) * 0.1, layers[1].name: torch.randn(8, 16),
               layers[2].name: torch.randn(8, 16) * 10}
    result = get_allocation("global").allocate(layers, 0.5, lambda name: weights[name].abs())
    pruned = sum(result[l.name] * l.numel for l in layers)
    assert round(pruned) == pruned_count(3 * 128, 0.5)
    assert result[layers[0].name] > result[layers[1].name] > result[layers[2].name]
    # the allocation reproduces a true global threshold
    everything = torch.cat([w.abs().flatten() for w in weights.values()])
    threshold = everything.kthvalue(pruned_count(everything.numel(), 0.5)).values
    for layer in layers:
        assert result[layer.name] * layer.numel == int((weights[layer.name].abs() <= threshold).sum())


def test_global_threshold_splits_ties_exactly():
    layers = _layers(blocks=2, per_block=1, shape=(2, 2))
    result = get_allocation("global").allocate(layers, 0.5, lambda name: torch.ones(2, 2))
    assert sum(result[l.name] * l.numel for l in layers) == 4


def test_owl_gives_outlier_rich_blocks_lower_sparsity_and_keeps_the_mean():
    torch.manual_seed(0)
    layers = _layers(blocks=4, per_block=1, shape=(32, 32))
    scores = {}
    for index, layer in enumerate(layers):
        base = torch.rand(32, 32)
        base.view(-1)[: 10 * index] = 100.0  # block i has 10·i outliers
        scores[layer.name] = base
    owl = get_allocation({"name": "owl", "threshold_m": 5, "lambda": 0.08})
    result = owl.allocate(layers, 0.7, lambda name: scores[name])
    values = [result[l.name] for l in layers]
    assert values == sorted(values, reverse=True)
    assert sum(values) / len(values) == pytest.approx(0.7)
    assert max(values) - min(values) == pytest.approx(0.16)


def test_owl_equal_ratios_fall_back_to_uniform():
    layers = _layers(blocks=3, per_block=1)
    result = get_allocation("owl").allocate(layers, 0.5, lambda name: torch.ones(8, 16))
    assert set(result.values()) == {0.5}


def test_owl_settings_are_validated():
    with pytest.raises(PrunekitError, match="allocation owl: lambda"):
        get_allocation({"name": "owl", "lambda": 0.7})
    with pytest.raises(PrunekitError, match="unknown allocation 'spiky'"):
        get_allocation("spiky")


def test_overrides_win_and_must_match():
    allocated = {"model.layers.0.mlp.up_proj": 0.5, "model.layers.1.mlp.up_proj": 0.5, "model.layers.1.self_attn.q_proj": 0.5}
    result = apply_overrides(allocated, {"model.layers.1.*": 0.2, "re:q_proj$": 0.0})
    assert result == {"model.layers.0.mlp.up_proj": 0.5, "model.layers.1.mlp.up_proj": 0.2,
                      "model.layers.1.self_attn.q_proj": 0.0}
    with pytest.raises(PrunekitError, match="matches no target"):
        apply_overrides(allocated, {"lm_head": 0.3})
    with pytest.raises(PrunekitError, match="in \\[0, 1\\)"):
        apply_overrides(allocated, {"*": 1.2})


def test_kth_smallest_radix_selection_matches_sorting():
    from prunekit.core.allocation.global_threshold import kth_smallest

    generator = torch.Generator().manual_seed(3)
    layers = {f"l{i}": torch.randn(17, 23, generator=generator).abs() * 10 ** (i - 2) for i in range(4)}
    layers["l4"] = torch.zeros(5, 5)
    everything = torch.cat([v.flatten() for v in layers.values()]).sort().values
    for k in (1, 2, 25, 26, 500, everything.numel()):
        assert kth_smallest(lambda n: layers[n], layers, k) == everything[k - 1]
