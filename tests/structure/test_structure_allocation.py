"""Width allocation: targets, floors, rounding, overrides, ignore lists, grouped-query constraints, bad ratios."""

from __future__ import annotations

import math

import pytest
import torch

from prunekit.errors import PrunekitError
from prunekit.structure.allocation import WidthAllocation, allocate
from prunekit.structure.shrink import check_removal, shrink
from structure_helpers import TOKENS, graph_of, run, tiny_llama

INPUTS = {"input_ids": TOKENS, "use_cache": False}


def _setup(mode="kv", **sizes):
    model = tiny_llama(layers=3, hidden=32, intermediate=96, heads=4, kv_heads=2, **sizes)
    graph, adapter = graph_of(model, INPUTS, mode)
    families = graph.select(["channels", "heads"])
    generator = torch.Generator().manual_seed(0)
    scores = {f.name: torch.rand(f.size, generator=generator, dtype=torch.float64) for f in families}
    return model, graph, adapter, families, scores


def test_uniform_reaches_the_target_with_equal_fractions():
    model, graph, adapter, families, scores = _setup()
    plan = allocate(graph, families, scores, 0.1, strategy=WidthAllocation(name="uniform", round_to=1))
    assert plan.achieved >= 0.1
    mlp_kept = {v[1] for k, v in plan.widths.items() if "mlp" in k}
    assert len(mlp_kept) == 1  # the same width in every layer
    # the least possible: one unit less in any family would miss the target
    smallest_unit = min(graph.parameter_count() - graph.parameter_count({f.name: 1}) for f in families)
    assert (plan.achieved - 0.1) * plan.total_before <= 3 * smallest_unit + 1
    assert plan.total_after == graph.parameter_count({k: v[0] - v[1] for k, v in plan.widths.items()})
    shrink(graph, plan.removal, adapter=adapter)
    assert sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()) == plan.total_after


def test_global_removes_the_lowest_scores_first_and_respects_floors():
    model, graph, adapter, families, scores = _setup()
    mlp = [f for f in families if f.kind == "channels"]
    scores = {f.name: s for f, s in zip(mlp, [torch.arange(96.0) / 1000, torch.arange(96.0), torch.arange(96.0)])}
    plan = allocate(graph, mlp, scores, 0.2, strategy=WidthAllocation(name="global", floor=0.25, round_to=1,
                                                                          normalize="none"))
    first = plan.widths[mlp[0].name]
    assert first[1] == math.ceil(0.25 * 96)  # the weak family goes down to its floor, not below
    assert plan.removal[mlp[0].name] == list(range(96 - first[1]))  # its lowest-scoring units
    for family in mlp[1:]:
        removed = plan.removal.get(family.name, [])
        assert removed == list(range(len(removed)))


def test_rounding_to_a_multiple():
    model, graph, adapter, families, scores = _setup()
    plan = allocate(graph, families, scores, 0.15, strategy=WidthAllocation(round_to=16))
    for family in families:
        kept = plan.widths[family.name][1]
        if family.kind == "channels":
            assert kept % 16 == 0
    assert plan.achieved >= 0.15


def test_overrides_and_ignore():
    model, graph, adapter, families, scores = _setup()
    fixed = families[0].name
    plan = allocate(graph, families, scores, 0.1, strategy=WidthAllocation(round_to=1), overrides={fixed: 0.5})
    assert plan.widths[fixed] == (96, 48)
    kept = graph.select(["channels", "heads"], ignore=["model.layers.1.*"])
    assert not any(f.name.startswith("model.layers.1.") for f in kept) and len(kept) == len(families) - 2
    with pytest.raises(PrunekitError, match="override pattern 'nothing.*' matches no prunable family"):
        allocate(graph, families, scores, 0.1, overrides={"nothing.*": 0.5})
    plan = allocate(graph, families, scores, 0.1, strategy=WidthAllocation(floor=0.5, round_to=1),
                    overrides={fixed: 0.9})
    assert plan.widths[fixed][1] == 48 and "below its floor" in plan.notes[0]  # the floor is kept, and said


def test_grouped_query_heads_keep_equal_counts_per_group():
    model, graph, adapter, families, scores = _setup(mode="query")
    heads = [f for f in families if f.kind == "heads"]
    assert all(f.groups == 2 and f.size == 4 for f in heads)
    plan = allocate(graph, families, scores, 0.2, strategy=WidthAllocation(round_to=1))
    for family in heads:
        kept = plan.widths[family.name][1]
        assert kept % 2 == 0
        removed = plan.removal.get(family.name, [])
        assert sum(1 for u in removed if u < 2) == sum(1 for u in removed if u >= 2)
    shrink(graph, plan.removal, adapter=adapter)
    attention = model.model.layers[0].self_attn
    assert attention.q_proj.out_features // attention.head_dim == attention.num_key_value_groups * 2
    run(model, INPUTS)


def test_impossible_requests_are_refused():
    model, graph, adapter, families, scores = _setup()
    for ratio in (1.0, 1.5, -0.1, float("nan")):
        with pytest.raises(PrunekitError, match="must be"):
            allocate(graph, families, scores, ratio)
    with pytest.raises(PrunekitError, match="cannot be reached: with every family at its floor"):
        allocate(graph, families, scores, 0.9)
    with pytest.raises(PrunekitError, match="override for 'x' must be in"):
        allocate(graph, families, scores, 0.1, overrides={"x": 1.0})
    with pytest.raises(PrunekitError, match="nothing to prune"):
        allocate(graph, [], scores, 0.1)
    with pytest.raises(PrunekitError, match="unknown target"):
        allocate(graph, families, scores, 0.1, target="flops")


def test_removals_that_break_the_structure_are_refused():
    model, graph, adapter, families, scores = _setup(mode="query")
    mlp = families[0]
    with pytest.raises(PrunekitError, match="would empty it"):
        check_removal(graph, {mlp.name: range(mlp.size)})
    with pytest.raises(PrunekitError, match="unit 96 does not exist"):
        check_removal(graph, {mlp.name: [96]})
    heads = [f for f in families if f.kind == "heads"][0]
    with pytest.raises(PrunekitError, match=r"same number of query heads removed from each of its 2 key/value groups, got \[1, 0\]"):
        check_removal(graph, {heads.name: [0]})
    with pytest.raises(PrunekitError, match="no prunable family named 'nope'"):
        check_removal(graph, {"nope": [0]})
