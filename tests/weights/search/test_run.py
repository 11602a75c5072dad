"""The search's sequential check (issue 18): the found levels and the search's start pruned as prune_weights
prunes them, measured, and the better one returned."""

import copy
import json
from pathlib import Path

import pytest
import torch

from prunekit.core.allocation.fitness import KLMeter, fitness_windows
from prunekit.models.base import adapter_for
from prunekit.weights.pipeline import plan_pruning, prune_weights, pruning_settings
from prunekit.weights.search import search_levels
from prunekit.weights.search.database import LevelDatabase, Stream, group_units
from tests.conftest import tiny_llama


def _model():
    return tiny_llama(layers=2, hidden=32, intermediate=64, heads=4, kv_heads=2, vocab=256, seed=3)


def _calibration():
    return torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(5))


def _settings(method, allocation, tmp_path):
    return pruning_settings(method, 0.5, batch_size=2,
                            allocation={"step": 0.25, "max_ratio": 0.75, "sensitivity_tokens": 32,
                                        "database": str(tmp_path / "db"), **allocation})


def _kl_when_pruned(model, method, levels, tokens):
    """KL(dense ‖ model pruned by prune_weights at ``levels``) on the first calibration windows of ``tokens``."""
    pruned = copy.deepcopy(model)
    meter = KLMeter(pruned, adapter_for(pruned), fitness_windows(_calibration(), tokens), keep_block_inputs=False)
    prune_weights(pruned, method, 0.5, calibration=_calibration(), batch_size=2,
                  allocation={"name": "knapsack", "levels": levels})
    return meter.kl()


@pytest.mark.parametrize("allocation,start", [({"name": "knapsack"}, "uniform"),
                                              ({"name": "evolutionary", "generations": 2, "offspring": 3,
                                                "stage_tokens": [16, 48], "survivors": [2]}, "knapsack")])
def test_sparsegpt_search_returns_the_better_of_start_and_found_once_pruned_sequentially(tmp_path, allocation,
                                                                                          start):
    model, calibration = _model(), _calibration()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = search_levels(model, _settings("sparsegpt", allocation, tmp_path), calibration)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert result.database["stream"] == "reference" and result.database["reference_ratio"] == 0.5
    check = result.sequential_check
    assert check["start"] == start and check["tokens"] == (48 if start == "knapsack" else 32)
    assert check["kept"] == ("start" if check["start_kl"] < check["found_kl"] else "found")
    kept = "start_ratio" if check["kept"] == "start" else "found_ratio"
    assert [u["ratio"] for u in result.units] == [u[kept] for u in result.units]
    if start == "uniform":
        assert {u["start_ratio"] for u in result.units} == {0.5}
    # what the check measured is the model prune_weights makes at the returned levels
    best = min(check["start_kl"], check["found_kl"])
    assert _kl_when_pruned(model, "sparsegpt", result.levels, check["tokens"]) == pytest.approx(best, rel=1e-5)
    assert result.seconds["sequential_check"] > 0


def test_wanda_search_keeps_the_dense_stream_and_skips_the_check_unless_asked(tmp_path):
    model, calibration = _model(), _calibration()
    plain = search_levels(model, _settings("wanda", {"name": "knapsack"}, tmp_path), calibration)
    assert plain.database["stream"] == "dense" and plain.sequential_check is None
    assert all(u["start_ratio"] is None and u["ratio"] == u["found_ratio"] for u in plain.units)
    asked = search_levels(model, _settings("wanda", {"name": "knapsack", "sequential_check": True}, tmp_path),
                          calibration)
    assert asked.database["reused"]  # the check is no part of the database's key
    assert asked.sequential_check["start"] == "uniform"
    best = min(asked.sequential_check["start_kl"], asked.sequential_check["found_kl"])
    assert _kl_when_pruned(model, "wanda", asked.levels, 32) == pytest.approx(best, rel=1e-5)


def test_reference_costs_are_centred_on_the_uniform_model(tmp_path):
    """Over the reference stream a unit's cost is the KL with it alone moved from the ratio's level, minus the
    uniform model's KL; the partial runs from the rebased block inputs agree with whole runs."""
    model, calibration = _model(), _calibration()
    settings = _settings("sparsegpt", {"name": "knapsack", "sequential_check": False}, tmp_path)
    result = search_levels(model, settings, calibration)
    assert result.sequential_check is None
    costs = [u["cost"] for u in result.units]  # the chosen step's cost: 0 where a unit stays at the ratio
    assert all(cost == 0.0 for cost, u in zip(costs, result.units) if u["ratio"] == 0.5)
    table = json.loads((Path(result.database["path"]) / "costs-kl-32-around-level-2.json").read_text())
    plan = plan_pruning(model, settings)
    units = group_units(plan.adapter, plan.targets, "sublayer")
    database = LevelDatabase(Path(result.database["path"]), units, [0.0, 0.25, 0.5, 0.75], Stream.reference(plan))
    meter = KLMeter(model, adapter_for(model), fitness_windows(calibration, 32), keep_block_inputs=False)

    def whole_run(steps):
        for unit, step in enumerate(steps):
            database.apply(unit, step)
        return meter.kl()

    uniform = whole_run([2, 2, 2, 2])
    for unit, step in [(0, 0), (2, 3), (3, 1)]:  # the first block's attention, the second's attention and MLP
        steps = [2, 2, 2, 2]
        steps[unit] = step
        assert table[units[unit].name][2] == 0.0
        assert table[units[unit].name][step] == pytest.approx(whole_run(steps) - uniform, rel=1e-4, abs=1e-6)
    whole_run([0, 0, 0, 0])


def test_a_search_refuses_asymmetric_calibration():
    from prunekit.errors import PrunekitError
    from prunekit.weights.recipe import PruneSettings

    settings = PruneSettings.build({"method": "sparsegpt", "ratio": 0.5, "allocation": "knapsack", "asymmetric": True},
                                   where="test")
    with pytest.raises(PrunekitError, match="twin stream"):
        search_levels(tiny_llama(layers=1, vocab=256), settings, torch.randint(0, 256, (2, 16)))
